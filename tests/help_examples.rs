//! Every command's `--help` ends with examples, and the man page's EXAMPLES section has one for
//! every command; each example parses as the command it shows, so none goes stale when a flag
//! changes.

use clap::{CommandFactory, Parser};
use vmref::cli::Cli;

/// The paths of every command below the top level (`["ref", "create"]`), groups included.
fn commands(cmd: &clap::Command, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        path.push(sub.get_name().to_string());
        out.push(path.clone());
        commands(sub, path, out);
        path.pop();
    }
}

fn all_commands() -> Vec<Vec<String>> {
    let mut out = Vec::new();
    commands(&Cli::command(), &mut Vec::new(), &mut out);
    out
}

fn is_leaf(path: &[String]) -> bool {
    let mut cmd = Cli::command();
    for p in path {
        cmd = cmd.find_subcommand(p).unwrap().clone();
    }
    !cmd.has_subcommands()
}

/// An example line as arguments: the part a shell would pass to the first vmref (no
/// redirect, pipe, `&&` or comment).
fn example_args(line: &str) -> Vec<String> {
    let line = line.split(" #").next().unwrap();
    let line = line.split(" >").next().unwrap();
    let line = line.split(" |").next().unwrap();
    let line = line.split(" &&").next().unwrap();
    line.split_whitespace().map(str::to_string).collect()
}

/// The example names the command: its words follow `vmref` and the global options.
fn shows(args: &[String], path: &[String]) -> bool {
    let mut rest: Vec<&String> = Vec::new();
    let mut value = false;
    for w in args.iter().skip(1) {
        if value {
            value = false;
        } else if w == "--store" || w == "--config" {
            value = true;
        } else {
            rest.push(w);
        }
    }
    rest.len() >= path.len() && rest.iter().zip(path).all(|(a, b)| *a == b)
}

fn parses(args: &[String]) -> Result<(), String> {
    Cli::try_parse_from(args)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[test]
fn every_command_help_shows_examples_that_parse() {
    for path in all_commands() {
        let mut cmd = Cli::command();
        let mut sub = &mut cmd;
        for p in &path {
            sub = sub.find_subcommand_mut(p).unwrap();
        }
        let help = sub.render_long_help().to_string();
        let (_, examples) = help.split_once("Examples:\n").unwrap_or_else(|| {
            panic!("`vmref {}` --help has no examples:\n{help}", path.join(" "))
        });
        let lines: Vec<Vec<String>> = examples
            .lines()
            .take_while(|l| l.starts_with("  "))
            .filter(|l| l.trim_start().starts_with("vmref "))
            .map(example_args)
            .collect();
        assert!(
            lines.iter().any(|a| shows(a, &path)),
            "`vmref {}` --help has no example of itself:\n{help}",
            path.join(" ")
        );
        for a in &lines {
            if let Err(e) = parses(a) {
                panic!(
                    "example {a:?} of `vmref {}` does not parse: {e}",
                    path.join(" ")
                );
            }
        }
    }
}

#[test]
fn the_man_page_has_an_example_of_every_command() {
    let man = include_str!("../man/vmref.1");
    let (_, ex) = man
        .split_once(".SH EXAMPLES\n")
        .expect("an EXAMPLES section");
    let ex = ex.split("\n.SH ").next().unwrap();
    let lines: Vec<Vec<String>> = ex
        .lines()
        .map(|l| l.replace("\\-", "-").replace("\\e", "\\"))
        .filter(|l| l.starts_with("vmref "))
        .map(|l| example_args(&l))
        .collect();
    for a in &lines {
        if let Err(e) = parses(a) {
            panic!("man page example {a:?} does not parse: {e}");
        }
    }
    for path in all_commands().into_iter().filter(|p| is_leaf(p)) {
        assert!(
            lines.iter().any(|a| shows(a, &path)),
            "the man page's EXAMPLES show no `vmref {}`",
            path.join(" ")
        );
    }
}
