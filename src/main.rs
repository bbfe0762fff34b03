use clap::Parser;

fn main() {
    restore_sigpipe();
    let cli = tlens::cli::Cli::parse();
    if let Err(e) = tlens::cli::run(cli) {
        // Names and strings from a file are shown escaped, never as raw escape sequences.
        eprintln!("error: {}", tlens::io::tree::escape(&e.to_string()));
        std::process::exit(1);
    }
}

/// Rust ignores SIGPIPE, so `tlens eval … | head` would panic on the closed pipe. Restore the
/// default action so the process ends quietly, as Unix tools do.
#[cfg(unix)]
fn restore_sigpipe() {
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGPIPE: i32 = 13;
    const SIG_DFL: usize = 0;
    // SAFETY: setting a signal's disposition to its default is async-signal-safe and done
    // before any other thread exists.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}

#[cfg(not(unix))]
fn restore_sigpipe() {}
