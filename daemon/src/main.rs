//! `ferryd`: the ferry node daemon.
mod protocol;
mod train;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("worker") {
        return train::run_worker(std::path::Path::new(&args[3]));
    }
    Ok(())
}
