//! grant, revoke, grants: roles of users and groups (SPEC §6; managers only).

use super::output::{self, Record};
use super::{CmdResult, CtlError, Ctx, invalid};
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
    /// The user the role is for: an account name, or a uid (the grant names its account)
    #[arg(long)]
    pub user: Option<String>,
    /// The group the role is for: a group name, or a gid (the grant names its group)
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
    fn spec(self) -> Result<GrantSpec, CtlError> {
        Ok(GrantSpec {
            role: self.role,
            user: self.user.map(user_name).transpose()?,
            group: self.group.map(group_name).transpose()?,
            key: self.key,
        })
    }
}

/// A `--user` as the grant names it: an account name as it is; a number that is no
/// account's name, as the account with that uid. Grants name accounts and kmsd looks the
/// names up on this same host, so the number is resolved here (as `chown` does).
fn user_name(given: String) -> Result<String, CtlError> {
    resolve(
        given,
        |n| uzers::get_user_by_name(n).is_some(),
        |id| uzers::get_user_by_uid(id).map(|u| u.name().to_owned()),
        "no account has uid",
    )
}

/// A `--group` as the grant names it: a name as it is, a number as the group of that gid.
fn group_name(given: String) -> Result<String, CtlError> {
    resolve(
        given,
        |n| uzers::get_group_by_name(n).is_some(),
        |id| uzers::get_group_by_gid(id).map(|g| g.name().to_owned()),
        "no group has gid",
    )
}

fn resolve(
    given: String,
    is_name: impl Fn(&str) -> bool,
    by_id: impl Fn(u32) -> Option<std::ffi::OsString>,
    none: &str,
) -> Result<String, CtlError> {
    let Ok(id) = given.parse::<u32>() else {
        return Ok(given);
    };
    if is_name(&given) {
        return Ok(given);
    }
    match by_id(id).map(std::ffi::OsString::into_string) {
        Some(Ok(name)) => Ok(name),
        Some(Err(name)) => Err(invalid(format!(
            "{id} is named {}, which is not UTF-8: a grant cannot name it",
            name.to_string_lossy()
        ))),
        None => Err(invalid(format!("{none} {id}"))),
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
        principal_id,
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
        // The uid or gid the name had when granted: the grant is that account's or group's.
        ("principal_id", json!(principal_id)),
        ("key_tag", json!(key_tag)),
        ("key_name", json!(key_name)),
        ("granted_at", output::time(Some(*granted_at))),
        ("granted_by", json!(granted_by)),
    ]
}

pub async fn grant(ctx: &mut Ctx, a: GrantArgs) -> CmdResult {
    let g = ctx.client.grant(a.spec()?).await?;
    ctx.out.record(grant_record(&g))?;
    Ok(0)
}

pub async fn revoke(ctx: &mut Ctx, a: GrantArgs) -> CmdResult {
    let g = ctx.client.revoke(a.spec()?).await?;
    ctx.out.record(grant_record(&g))?;
    Ok(0)
}

pub async fn list(ctx: &mut Ctx) -> CmdResult {
    let grants = ctx.client.grants().await?;
    ctx.out.emit_list(&grants, grant_record, || {
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
    })?;
    Ok(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A numeric --user or --group names the account or group of that id (root is uid
    /// and gid 0 everywhere); a name stays as given; an id nobody has is refused here
    /// with invalid-argument (exit 5), as kmsd refuses an unknown name.
    #[test]
    fn numeric_principals_name_their_account() {
        assert_eq!(user_name("0".into()).unwrap(), "root");
        assert_eq!(group_name("0".into()).unwrap(), "root");
        assert_eq!(user_name("alice".into()).unwrap(), "alice");
        assert_eq!(group_name("no-such-group".into()).unwrap(), "no-such-group");
        let e = user_name("4242424".into()).unwrap_err();
        assert_eq!((e.kind(), e.exit_code()), ("invalid-argument", 5));
        assert_eq!(e.message(), "no account has uid 4242424");
        let e = group_name("4242424".into()).unwrap_err();
        assert_eq!(e.message(), "no group has gid 4242424");
    }
}
