//! `ckpt generate`: the man pages and shell completions, made from the
//! command's own clap definition (so they can never disagree with it).
//! Hidden: `scripts/install.sh` runs it to install them.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap_complete::Shell;

#[derive(clap::Subcommand)]
pub(crate) enum GenerateCmd {
    /// Write ckpt.1 and one ckpt-SUBCOMMAND.1 per subcommand into DIR.
    Man {
        /// The directory to write into (made if missing), e.g. PREFIX/share/man/man1.
        dir: PathBuf,
    },
    /// Print the completion script for SHELL (bash, zsh, fish, elvish, powershell) on stdout.
    Completion {
        shell: Shell,
    },
}

pub(crate) fn run(what: GenerateCmd, cmd: clap::Command) -> Result<()> {
    match what {
        GenerateCmd::Man { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot make {}; choose a directory you may write", dir.display()))?;
            // One page per visible subcommand (hidden ones, like this one,
            // get none), named ckpt-SUB.1, and ckpt.1 listing them.
            clap_mangen::generate_to(cmd, &dir).with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
        }
        GenerateCmd::Completion { shell } => {
            let mut cmd = cmd;
            clap_complete::generate(shell, &mut cmd, "ckpt", &mut std::io::stdout());
        }
    }
    Ok(())
}
