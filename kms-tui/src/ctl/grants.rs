//! grant, revoke, grants: roles of users and groups (SPEC §6; managers only).

use super::output::{self, Record};
use super::{CmdResult, Ctx};
use clap::{ArgGroup, Args};
use kms_shared::model::{GrantInfo, Principal, Role};
use kms_shared::protocol::GrantSpec;
use serde_json::json;

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("principal").required(true).args(["user", "group"])))]
pub struct GrantArgs {
    /// manager, key-manager, key-reviewer or key-user (NCP names are accepted too)
    #[arg(value_parser = parse_role)]
    pub role: Role,
    /// The user the role is for
    #[arg(long)]
    pub user: Option<String>,
    /// The group the role is for
    #[arg(long)]
    pub group: Option<String>,
    /// Limit the role to one key (tag or name); default: all keys
    #[arg(long)]
    pub key: Option<String>,
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

impl GrantArgs {
    fn spec(self) -> GrantSpec {
        GrantSpec {
            role: self.role,
            user: self.user,
            group: self.group,
            key: self.key,
        }
    }
}

pub fn grant_record(g: &GrantInfo) -> Record {
    let GrantInfo {
        id,
        role,
        principal,
        key_tag,
        key_name,
        granted_at,
        granted_by,
    } = g;
    let (kind, name) = match principal {
        Principal::User(u) => ("user", u),
        Principal::Group(g) => ("group", g),
    };
    vec![
        ("id", json!(id)),
        ("role", json!(role.as_str())),
        ("principal_type", json!(kind)),
        ("principal", json!(name)),
        ("key_tag", json!(key_tag)),
        ("key_name", json!(key_name)),
        ("granted_at", output::time(Some(*granted_at))),
        ("granted_by", json!(granted_by)),
    ]
}

pub async fn grant(ctx: &mut Ctx, a: GrantArgs) -> CmdResult {
    let g = ctx.client.grant(a.spec()).await?;
    ctx.out.record(grant_record(&g))?;
    Ok(0)
}

pub async fn revoke(ctx: &mut Ctx, a: GrantArgs) -> CmdResult {
    let g = ctx.client.revoke(a.spec()).await?;
    ctx.out.record(grant_record(&g))?;
    Ok(0)
}

pub async fn list(ctx: &mut Ctx) -> CmdResult {
    let grants = ctx.client.grants().await?;
    ctx.out.emit(
        || output::list_json(&grants, grant_record),
        || {
            let rows: Vec<Vec<String>> = grants
                .iter()
                .map(|g| {
                    let (kind, name) = match &g.principal {
                        Principal::User(u) => ("user", u.clone()),
                        Principal::Group(gr) => ("group", gr.clone()),
                    };
                    vec![
                        g.id.to_string(),
                        g.role.to_string(),
                        format!("{kind} {name}"),
                        g.key_name.clone().unwrap_or_else(|| "*".into()),
                        kms_shared::model::format_time(g.granted_at),
                        g.granted_by.clone(),
                    ]
                })
                .collect();
            output::table(&["ID", "ROLE", "FOR", "KEY", "GRANTED", "BY"], &rows)
        },
    )?;
    Ok(0)
}
