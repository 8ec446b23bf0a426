//! The vmref binary: parse arguments, set up logging, run, print any error once.

use clap::Parser;

fn main() {
    let cli = vmref::cli::Cli::parse();
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp(None)
        .init();
    if let Err(e) = vmref::commands::run(cli) {
        if let vmref::Error::Io { source, .. } = &e
            && source.kind() == std::io::ErrorKind::BrokenPipe
        {
            std::process::exit(0);
        }
        eprintln!("vmref: {e}");
        std::process::exit(1);
    }
}
