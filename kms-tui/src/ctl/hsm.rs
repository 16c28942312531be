//! hsm add, hsm list, hsm remove: the PKCS#11 tokens of `dedicated-hsm` keys (SPEC §9,
//! §11; managers only).

use super::output::{self, Record};
use super::{CmdResult, Ctx};
use clap::{Args, Subcommand};
use kms_shared::protocol::HsmTokenInfo;
use serde_json::json;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum HsmCommand {
    /// Register a PKCS#11 token for dedicated-hsm keys
    ///
    /// kmsd loads the module, finds the token by its label and logs in with the PIN from
    /// the file before it registers anything. The PIN file must be readable by kmsd; its
    /// path is stored, never the PIN.
    Add(AddArgs),
    /// List the registered tokens
    List,
    /// Forget a registered token (refused while keys not yet purged live on it)
    Remove(NameArg),
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The name keys use to choose the token (3–15 characters)
    pub name: String,
    /// The PKCS#11 module (a shared library owned by root or kmsd's account, writable by
    /// no one else, in directories likewise)
    #[arg(long, value_name = "PATH")]
    pub module: PathBuf,
    /// The token's label
    #[arg(long, value_name = "LABEL")]
    pub token: String,
    /// A file whose first line is the token's user PIN
    #[arg(long, value_name = "FILE")]
    pub pin_file: PathBuf,
}

#[derive(Debug, Args)]
pub struct NameArg {
    /// The token's registered name
    pub name: String,
}

pub fn token_record(t: &HsmTokenInfo) -> Record {
    let HsmTokenInfo {
        name,
        module,
        token,
        pin_file,
        added_at,
        added_by,
        keys,
    } = t;
    vec![
        ("name", json!(name)),
        ("module", json!(module)),
        ("token", json!(token)),
        ("pin_file", json!(pin_file)),
        ("keys", json!(keys)),
        ("added_at", output::time(Some(*added_at))),
        ("added_by", json!(added_by)),
    ]
}

/// Paths are sent absolute: the daemon resolves nothing relative to its own directory.
fn absolute(p: PathBuf) -> String {
    std::path::absolute(&p).unwrap_or(p).display().to_string()
}

pub async fn run(ctx: &mut Ctx, command: HsmCommand) -> CmdResult {
    match command {
        HsmCommand::Add(a) => {
            let t = ctx
                .client
                .hsm_add(
                    &a.name,
                    &absolute(a.module),
                    &a.token,
                    &absolute(a.pin_file),
                )
                .await?;
            ctx.out.record(token_record(&t))?;
        }
        HsmCommand::List => {
            let tokens = ctx.client.hsm_list().await?;
            ctx.out.emit_list(&tokens, token_record, || {
                let rows: Vec<Vec<String>> = tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.token.clone(),
                            t.module.clone(),
                            t.keys.to_string(),
                            kms_shared::model::format_time(t.added_at),
                            t.added_by.clone(),
                        ]
                    })
                    .collect();
                output::table(&["NAME", "TOKEN", "MODULE", "KEYS", "ADDED", "BY"], &rows)
            })?;
        }
        HsmCommand::Remove(n) => {
            let t = ctx.client.hsm_remove(&n.name).await?;
            ctx.out.record(token_record(&t))?;
        }
    }
    Ok(0)
}
