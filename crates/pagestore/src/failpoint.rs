//! Named points where a test can make the process die, to prove that a crash at any step leaves
//! a readable image: `STRATA_FAILPOINTS=checkpoint-after-segments,compaction-after-manifest`
//! aborts the process the first time it reaches one of them.

use std::sync::OnceLock;

fn armed() -> &'static Vec<String> {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("STRATA_FAILPOINTS")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Abort the process here if the failpoint `name` is armed.
pub fn failpoint(name: &str) {
    if armed().iter().any(|a| a == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}
