use clap::Parser;

fn main() {
    let cli = tlens::cli::Cli::parse();
    if let Err(e) = tlens::cli::run(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
