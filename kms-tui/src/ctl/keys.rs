//! Commands that create keys and read what the daemon knows about them.

use super::output;
use super::{CmdResult, Ctx, choice};
use clap::Args;
use kms_shared::model::{KeyType, Protection};
use kms_shared::protocol::CreateKey;

const PROTECTIONS: [Protection; 3] = [Protection::Basic, Protection::Hsm, Protection::DedicatedHsm];

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// 3–15 characters: a letter, then letters, digits, '-' or '_'
    pub name: String,
    #[arg(long = "type", value_name = "TYPE", ignore_case = true, value_parser = choice(&KeyType::ALL, KeyType::as_str))]
    pub key_type: KeyType,
    #[arg(long, default_value = "basic", value_parser = choice(&PROTECTIONS, Protection::as_str))]
    pub protection: Protection,
    /// Deterministic encryption per context (AES256 only)
    #[arg(long)]
    pub convergent: bool,
    /// Rotate automatically every --rotation-days
    #[arg(long)]
    pub auto_rotate: bool,
    /// Rotation period with --auto-rotate, 1–730 days [default: 90]
    // Without --auto-rotate it made a key that never rotates, silently (`set-rotation`
    // refuses a period alone for the same reason).
    #[arg(long, value_name = "N", requires = "auto_rotate", value_parser = super::rotation_days)]
    pub rotation_days: Option<u32>,
    /// Free text, at most 100 characters
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub memo: String,
    /// The registered token of a dedicated-hsm key (see `kmsctl hsm list`)
    #[arg(long, value_name = "NAME")]
    pub hsm: Option<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Also list purged keys still in retention
    #[arg(long)]
    pub deleted: bool,
}

#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Key tag or name
    pub key: String,
    #[arg(value_name = "N")]
    pub version: u32,
}

pub async fn create(ctx: &mut Ctx, a: CreateArgs) -> CmdResult {
    let key = ctx
        .client
        .create_key(CreateKey {
            name: a.name,
            key_type: a.key_type,
            protection: a.protection,
            convergent: a.convergent,
            auto_rotation: a.auto_rotate,
            rotation_days: a.rotation_days,
            memo: a.memo,
            hsm: a.hsm,
        })
        .await?;
    ctx.out.key(&key)?;
    Ok(0)
}

pub async fn list(ctx: &mut Ctx, a: ListArgs) -> CmdResult {
    let (keys, _total) = ctx.client.list_keys(a.deleted, 0, None).await?;
    ctx.out
        .emit_list(&keys, output::key_record, || output::keys_table(&keys))?;
    Ok(0)
}

pub async fn show(ctx: &mut Ctx, key: &str) -> CmdResult {
    let info = ctx.client.get_key(key).await?;
    ctx.out.key(&info)?;
    Ok(0)
}

pub async fn versions(ctx: &mut Ctx, key: &str) -> CmdResult {
    let versions = ctx.client.versions(key).await?;
    let info = ctx.client.get_key(key).await?;
    ctx.out.versions(&versions, info.key_type)?;
    note_inherited_state(ctx, &info);
    Ok(0)
}

/// A version's flag is its own, but the key's state is every version's (SPEC §3): of a
/// disabled key, a version shown `ENABLED true` does not work. Said on standard error,
/// so that the table stays what scripts read.
fn note_inherited_state(ctx: &Ctx, info: &kms_shared::model::KeyInfo) {
    if !ctx.out.json && info.state != kms_shared::model::KeyState::Enabled {
        eprintln!(
            "note: key {} is {}: no version works until the key is enabled again",
            info.name, info.state
        );
    }
}

pub async fn set_version(ctx: &mut Ctx, a: VersionArgs, enabled: bool) -> CmdResult {
    let versions = if enabled {
        ctx.client.enable_version(&a.key, a.version).await?
    } else {
        ctx.client.disable_version(&a.key, a.version).await?
    };
    // The versions say nothing of the key's type, which says whether they are counted.
    let info = ctx.client.get_key(&a.key).await?;
    ctx.out.versions(&versions, info.key_type)?;
    note_inherited_state(ctx, &info);
    Ok(0)
}

pub async fn impact(ctx: &mut Ctx, key: &str) -> CmdResult {
    let impact = ctx.client.impact(key, None).await?;
    ctx.out.emit(
        || output::to_json(output::impact_record(&impact)),
        || output::impact_text(&impact),
    )?;
    Ok(0)
}

pub async fn status(ctx: &mut Ctx) -> CmdResult {
    let status = ctx.client.status().await?;
    ctx.out.record(output::status_record(&status))?;
    Ok(0)
}
