//! `strata apply`, `strata diff` and `strata spec`: declarative specs.

use std::path::PathBuf;

use anyhow::{bail, Context};
use strata_api::v1 as pb;

use super::target::{api_error, Target};

/// `strata apply` and `strata diff`
#[derive(Debug, clap::Args)]
pub struct SpecArgs {
    /// The spec (YAML); `-` reads standard input.
    #[arg(short, long)]
    pub file: PathBuf,
    /// Also delete the volumes an earlier apply declared that this spec no longer names.
    #[arg(long)]
    pub prune: bool,
}

/// `strata spec …`
#[derive(Debug, clap::Subcommand)]
pub enum SpecCommand {
    /// Print the spec last applied.
    Get,
}

fn read_spec(path: &PathBuf) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        return Ok(s);
    }
    std::fs::read_to_string(path).with_context(|| format!("read spec {}", path.display()))
}

/// Apply a spec (or with `dry_run`, show what applying it would do).
pub async fn apply(target: &Target, args: &SpecArgs, dry_run: bool) -> anyhow::Result<()> {
    let spec = read_spec(&args.file)?;
    let mut c = pb::specs_client::SpecsClient::new(target.channel().await?);
    let r = c
        .apply(pb::ApplyRequest {
            spec,
            dry_run,
            prune: args.prune,
        })
        .await
        .map_err(api_error)?
        .into_inner();
    target.print(&r, |r| {
        if r.unchanged && r.actions.is_empty() {
            println!("no changes: the volumes are as the spec says");
        }
        for a in &r.actions {
            let mark = match (a.verb.as_str(), dry_run, a.done) {
                ("refuse", _, _) => "!",
                ("keep", _, _) => "=",
                ("delete" | "remove-replica" | "unexport", true, _) => "-",
                (_, true, _) => "+",
                (_, false, true) => "✓",
                (_, false, false) => "?",
            };
            println!("{mark} {:<14} {:<24} {}", a.verb, a.path, a.message);
        }
    })?;
    if r.actions.iter().any(|a| a.verb == "refuse") {
        bail!("some of the spec was refused (lines marked !)");
    }
    Ok(())
}

pub async fn spec(target: &Target, cmd: &SpecCommand) -> anyhow::Result<()> {
    let SpecCommand::Get = cmd;
    let mut c = pb::specs_client::SpecsClient::new(target.channel().await?);
    let r = c
        .get_spec(pb::GetSpecRequest {})
        .await
        .map_err(api_error)?
        .into_inner();
    target.print(&r, |r| print!("{}", r.spec))
}
