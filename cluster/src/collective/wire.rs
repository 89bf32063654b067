//! Values on the wire: f32 as it is, or rounded to bf16 or fp16 to halve the bytes between
//! hosts (`train.grad_compression`). The conversions are written to vectorise: bf16 with
//! integer operations, fp16 with the CPU's F16C instructions where it has them (the `half`
//! crate's slice conversions detect them at run time).

use half::f16;
use half::slice::HalfFloatSliceExt;

/// How an all-reduce's values travel between hosts. Sums are always taken in f32; with a
/// 16-bit wire the values are rounded to it on the way (partial sums at every hop, and the
/// final sum once), so the result differs from an f32 all-reduce by about that rounding and
/// is the same on every rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wire {
    #[default]
    F32,
    Bf16,
    F16,
}

/// Values converted per pass through a stack buffer.
const BLOCK: usize = 1024;

/// f32 to bf16, rounding to nearest even; NaN stays NaN (quiet), infinities stay infinite.
#[inline(always)]
fn to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if nan {
        ((b >> 16) as u16) | 0x40
    } else {
        rounded
    }
}

#[inline(always)]
fn from_bf16(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// The bf16 loops, compiled a second time for AVX2 and picked at run time: the baseline
/// x86-64 target cannot narrow 32-bit lanes to 16 in vectors, so without it they stay
/// scalar (measured: encoding took a third of a compressed all-reduce's time).
mod simd {
    use super::{from_bf16, to_bf16};

    #[inline(always)]
    fn encode(src: &[f32], dst: &mut [u16]) {
        src.iter()
            .zip(dst.iter_mut())
            .for_each(|(v, d)| *d = to_bf16(*v));
    }

    #[inline(always)]
    fn decode(src: &[u16], dst: &mut [f32], add: bool) {
        if add {
            dst.iter_mut()
                .zip(src)
                .for_each(|(d, b)| *d += from_bf16(*b));
        } else {
            dst.iter_mut()
                .zip(src)
                .for_each(|(d, b)| *d = from_bf16(*b));
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    mod avx2 {
        #[target_feature(enable = "avx2")]
        pub(super) fn encode(src: &[f32], dst: &mut [u16]) {
            super::encode(src, dst)
        }

        #[target_feature(enable = "avx2")]
        pub(super) fn decode(src: &[u16], dst: &mut [f32], add: bool) {
            super::decode(src, dst, add)
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn has_avx2() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
    }

    pub(super) fn encode_bf16(src: &[f32], dst: &mut [u16]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { avx2::encode(src, dst) };
        }
        encode(src, dst)
    }

    pub(super) fn decode_bf16(src: &[u16], dst: &mut [f32], add: bool) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { avx2::decode(src, dst, add) };
        }
        decode(src, dst, add)
    }
}

impl Wire {
    /// Bytes per value on the wire.
    pub fn bytes(self) -> usize {
        match self {
            Wire::F32 => 4,
            Wire::Bf16 | Wire::F16 => 2,
        }
    }

    /// Its code in an operation's header, so that ranks that disagree fail instead of
    /// misreading each other's bytes.
    pub(crate) fn code(self) -> u32 {
        match self {
            Wire::F32 => 0,
            Wire::Bf16 => 1,
            Wire::F16 => 2,
        }
    }

    /// Encodes `src` for a 16-bit wire into `dst` (the same length).
    pub(crate) fn encode(self, src: &[f32], dst: &mut [u16]) {
        match self {
            Wire::F32 => unreachable!("f32 travels as it is"),
            Wire::Bf16 => simd::encode_bf16(src, dst),
            Wire::F16 => {
                let dst: &mut [f16] = bytemuck::cast_slice_mut(dst);
                dst.convert_from_f32_slice(src);
            }
        }
    }

    /// Adds (`add`) or copies the 16-bit values `src` into `dst`.
    pub(crate) fn decode(self, src: &[u16], dst: &mut [f32], add: bool) {
        match (self, add) {
            (Wire::F32, _) => unreachable!("f32 travels as it is"),
            (Wire::Bf16, add) => simd::decode_bf16(src, dst, add),
            (Wire::F16, false) => {
                let src: &[f16] = bytemuck::cast_slice(src);
                src.convert_to_f32_slice(dst);
            }
            (Wire::F16, true) => {
                let src: &[f16] = bytemuck::cast_slice(src);
                let mut block = [0f32; BLOCK];
                for (s, d) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)) {
                    let b = &mut block[..s.len()];
                    s.convert_to_f32_slice(b);
                    d.iter_mut().zip(b.iter()).for_each(|(d, v)| *d += *v);
                }
            }
        }
    }

    /// Rounds `values` to what this wire can carry (nothing for f32).
    pub fn round(self, values: &mut [f32]) {
        if self == Wire::F32 {
            return;
        }
        let mut block = [0u16; BLOCK];
        for chunk in values.chunks_mut(BLOCK) {
            let b = &mut block[..chunk.len()];
            self.encode(chunk, b);
            self.decode(b, chunk, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_match_the_half_crate_and_keep_special_values() {
        let mut values: Vec<f32> = (0..10_000).map(|i| (i as f32 - 5000.0) * 0.37e-3).collect();
        values.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            65504.0,
            70000.0,
            1.0 + 1.0 / 256.0, // a bf16 tie: rounds to even
        ]);
        for wire in [Wire::Bf16, Wire::F16] {
            let mut enc = vec![0u16; values.len()];
            wire.encode(&values, &mut enc);
            for (v, e) in values.iter().zip(&enc) {
                let want = match wire {
                    Wire::Bf16 => half::bf16::from_f32(*v).to_bits(),
                    _ => f16::from_f32(*v).to_bits(),
                };
                assert_eq!(*e, want, "{wire:?} {v}");
            }
            let mut dec = vec![1.0f32; values.len()];
            wire.decode(&enc, &mut dec, true);
            let mut once = values.clone();
            wire.round(&mut once);
            for ((d, o), v) in dec.iter().zip(&once).zip(&values) {
                assert!(*d == o + 1.0 || (o.is_nan() && d.is_nan()), "{wire:?} {v}");
            }
        }
        let mut nan = [f32::NAN];
        Wire::Bf16.round(&mut nan);
        assert!(nan[0].is_nan());
    }
}
