//! The vmref binary: parse arguments, set up logging, run, print any error once. The
//! terminal progress bar is the binary's too (`bar`).

mod bar;

use clap::Parser;

fn main() {
    let cli = vmref::cli::Cli::parse();
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        // fuser warns when it finds its mount already gone, which is how every unmount ends.
        (false, 0) => "warn,fuser=error",
        (false, 1) => "info,fuser=error",
        (false, _) => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp(None)
        // Lines the log cannot take (a full store holds the daemon's log) wait in memory.
        .target(env_logger::Target::Pipe(Box::new(
            vmref::logfile::LogWriter::default(),
        )))
        .write_style(env_logger::WriteStyle::Never)
        .init();
    let progress = bar::Bar::new(cli.quiet);
    if let Err(e) = vmref::commands::run(cli, &progress) {
        // A closed pipe (`vmref ref list | head`) is a normal stop, not an error.
        if let vmref::Error::Io { source, .. } = &e
            && source.kind() == std::io::ErrorKind::BrokenPipe
        {
            std::process::exit(0);
        }
        eprintln!("vmref: {e}");
        std::process::exit(1);
    }
}
