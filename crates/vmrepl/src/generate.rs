//! Shell completions and manual pages, both made from the CLI's one definition ([`Args`]), so
//! they never disagree with `--help`. `scripts/package.sh` ships them in the .deb.

use crate::cli::Args;
use anyhow::{Context, Result};
use clap::CommandFactory;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes the completion script of `shell` to `out`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn Write) -> Result<()> {
    let mut cmd = Args::command();
    clap_complete::generate(shell, &mut cmd, "vmrepl", out);
    out.flush().context("writing the completion script")
}

/// Writes `vmrepl.1` and one page per visible subcommand, at every depth
/// (`vmrepl-replication-server.1`, ...), into `dir`; returns the files written.
pub fn man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = Args::command().disable_help_subcommand(true);
    // Gives every subcommand its full name (`vmrepl-replication-server`) for its page.
    cmd.build();
    let mut written = Vec::new();
    write_pages(cmd, dir, &mut written)?;
    written.sort();
    Ok(written)
}

fn write_pages(cmd: clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub.clone(), dir, written)?;
    }
    let page = clap_mangen::Man::new(cmd)
        .manual("vmrepl manual")
        .source(format!("vmrepl {}", env!("CARGO_PKG_VERSION")));
    let path = page
        .generate_to(dir)
        .with_context(|| format!("writing {} into {}", page.get_filename(), dir.display()))?;
    written.push(path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap_complete::Shell;

    fn script(shell: Shell) -> String {
        let mut out = Vec::new();
        completions(shell, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_completion_scripts_know_the_subcommands() {
        let bash = script(Shell::Bash);
        assert!(bash.contains("replication") && bash.contains("failover"));
        assert!(
            bash.contains("complete -F _vmrepl"),
            "a bash function: {bash:.200}"
        );
        assert!(
            bash.contains("--replica-server"),
            "options of subcommands too"
        );
        assert!(script(Shell::Zsh).starts_with("#compdef vmrepl"));
        assert!(script(Shell::Fish).contains("complete -c vmrepl"));
        for shell in [Shell::Elvish, Shell::PowerShell] {
            assert!(script(shell).contains("replication"), "{shell}");
        }
    }

    #[test]
    fn man_pages_cover_every_visible_subcommand_with_a_roff_header() {
        let dir = tempfile::tempdir().unwrap();
        let pages = man_pages(dir.path()).unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "vmrepl.1",
            "vmrepl-daemon.1",
            "vmrepl-replication.1",
            "vmrepl-replication-server.1",
            "vmrepl-failover.1",
            "vmrepl-vm-create.1",
            "vmrepl-completions.1",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        assert!(
            !names
                .iter()
                .any(|n| n == "vmrepl-man.1" || n.contains("help")),
            "hidden and help commands get no page: {names:?}"
        );
        for p in &pages {
            let text = std::fs::read_to_string(p).unwrap();
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let th = format!(".TH {name} 1 ");
            assert!(
                text.lines().take(5).any(|l| l.starts_with(&th)),
                "{}: no .TH header:\n{text:.300}",
                p.display()
            );
            assert!(text.contains(".SH NAME"), "{}", p.display());
        }
        let top = std::fs::read_to_string(dir.path().join("vmrepl.1")).unwrap();
        assert!(top.contains("vmrepl manual") && top.contains("replication"));
    }
}
