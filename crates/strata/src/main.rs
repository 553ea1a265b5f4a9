//! The `strata` command: see [`strata::cli`].

fn main() -> std::process::ExitCode {
    strata::cli::main()
}
