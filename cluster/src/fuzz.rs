//! Seeded input mutation for the bounded fuzz tests of ferry's readers (specs, wire frames,
//! data files): a mutation of a valid input (bytes flipped, cut, repeated, spliced with
//! hostile fragments, length fields set to extremes) or plain noise.

/// xorshift64*: small, seeded, reproducible.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Hostile fragments: deep nesting, anchors and aliases, huge numbers, odd unicode, tags.
pub const TOKENS: &[&str] = &[
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    "{{{{{{{{{{{{{{{{{{{{",
    "&a [*a, *a, *a, *a]",
    "*undefined",
    "!!binary AAAA",
    "!!python/object:os.system",
    "18446744073709551616",
    "-9223372036854775809",
    "1e308",
    ".nan",
    "\u{0}",
    "\u{202e}",
    "\u{feff}",
    "..",
    "/etc/shadow",
    "\n  - ",
    ": : :",
    "'unterminated",
    "\"\\u0000\"",
    "? complex key",
    "<<: *a",
    "\t",
];

/// One mutation of `seed`.
pub fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(6) {
        let at = rng.below(v.len() + 1);
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next_u64() as u8;
            }
            1 => v.truncate(at),
            2 if at < v.len() => {
                let end = (at + rng.below(64)).min(v.len());
                let chunk = v[at..end].to_vec();
                for _ in 0..rng.below(8) {
                    v.splice(at..at, chunk.iter().copied());
                }
            }
            3 => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                v.splice(at..at, t.iter().copied());
            }
            4 if at < v.len() => {
                let end = (at + rng.below(32)).min(v.len());
                v.drain(at..end);
            }
            5 => {
                let noise: Vec<u8> = (0..rng.below(32)).map(|_| rng.next_u64() as u8).collect();
                v.splice(at..at, noise);
            }
            _ => {
                // A 32-bit field set to an extreme (lengths and counts in frames).
                if at + 4 <= v.len() {
                    let x = [0u32, 1, 0x7fff_ffff, u32::MAX][rng.below(4)];
                    v[at..at + 4].copy_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
    v
}
