//! Commands that change a key's state or settings. Each prints the key as it is after
//! the change.

use super::output::accounts_summary;
use super::{CmdResult, Ctx};
use clap::{ArgGroup, Args};
use kms_shared::client::Client;
use kms_shared::model::{DAY_MS, Impact, KeyState};

/// The window of the usage shown before a destructive action (the console's).
const IMPACT_DAYS: i64 = 30;

#[derive(Debug, Clone, Copy)]
pub enum Op {
    Rotate,
    Enable,
    Disable,
    Delete,
    CancelDeletion,
    DeleteNow,
}

// One of the two flags is required; `missing_mode` says so in words (clap's own message
// only lists the group).
#[derive(Debug, Args)]
#[command(
    group(ArgGroup::new("mode").args(["auto_rotate", "no_auto_rotate"])),
    override_usage = "kmsctl set-rotation <--auto-rotate|--no-auto-rotate> [--rotation-days <N>] <KEY>"
)]
pub struct SetRotationArgs {
    /// Key tag or name
    pub key: String,
    /// Rotate automatically, every --rotation-days (else the key's period)
    #[arg(long)]
    pub auto_rotate: bool,
    /// Do not rotate automatically (--rotation-days only sets the period)
    #[arg(long)]
    pub no_auto_rotate: bool,
    /// Rotation period, 1–730 days (moves the next rotation date at once)
    #[arg(long, value_name = "N", value_parser = super::rotation_days)]
    pub rotation_days: Option<u32>,
}

impl SetRotationArgs {
    /// Why the command line cannot be run: neither --auto-rotate nor --no-auto-rotate
    /// (kmsd's `set_rotation` always sets the flag, and a period alone does not say it).
    pub fn missing_mode(&self) -> Option<String> {
        if self.auto_rotate || self.no_auto_rotate {
            return None;
        }
        Some(match self.rotation_days {
            Some(n) => format!(
                "--rotation-days alone does not say whether {key} rotates: add --auto-rotate \
                 to rotate it automatically every {n} days, or --no-auto-rotate to set the \
                 period with automatic rotation off",
                key = self.key
            ),
            None => format!(
                "set-rotation needs --auto-rotate (rotate {key} automatically) or \
                 --no-auto-rotate (stop), and optionally --rotation-days N",
                key = self.key
            ),
        })
    }
}

#[derive(Debug, Args)]
pub struct SetMemoArgs {
    /// Key tag or name
    pub key: String,
    /// At most 100 characters; "" clears the memo
    pub text: String,
}

#[derive(Debug, Args)]
pub struct DeleteNowArgs {
    /// Key tag or name
    pub key: String,
    /// Confirm that the key material is to be destroyed now
    #[arg(long)]
    pub yes: bool,
}

pub async fn run(ctx: &mut Ctx, op: Op, key: &str) -> CmdResult {
    let c = &ctx.client;
    let info = match op {
        Op::Rotate => c.rotate(key).await?,
        Op::Enable => c.enable(key).await?,
        Op::Disable => {
            warn_impact(c, key, &[KeyState::Enabled]).await;
            c.disable(key).await?
        }
        Op::Delete => {
            warn_impact(c, key, &[KeyState::Enabled, KeyState::Disabled]).await;
            c.request_deletion(key).await?
        }
        Op::CancelDeletion => c.cancel_deletion(key).await?,
        Op::DeleteNow => c.delete_now(key).await?,
    };
    ctx.out.key(&info)?;
    Ok(0)
}

pub async fn set_rotation(ctx: &mut Ctx, a: SetRotationArgs) -> CmdResult {
    let info = ctx
        .client
        .set_rotation(&a.key, a.auto_rotate, a.rotation_days)
        .await?;
    ctx.out.key(&info)?;
    Ok(0)
}

pub async fn set_memo(ctx: &mut Ctx, a: SetMemoArgs) -> CmdResult {
    let info = ctx.client.set_memo(&a.key, &a.text).await?;
    ctx.out.key(&info)?;
    Ok(0)
}

/// The console's "this key is in use" warning, on stderr so that stdout stays parseable,
/// given only when the key is in a state the action applies to (`from`): a warning
/// followed by "the key is already disabled" misleads. The warning is advice: if it
/// cannot be fetched the action still goes ahead, and the action's own reply reports any
/// real problem (a missing key, a refusal).
async fn warn_impact(client: &Client, key: &str, from: &[KeyState]) {
    if !client
        .get_key(key)
        .await
        .is_ok_and(|k| from.contains(&k.state))
    {
        return;
    }
    if let Ok(impact) = client.impact(key, Some(IMPACT_DAYS * DAY_MS)).await
        && let Some(w) = impact_warning(key, &impact)
    {
        eprintln!("{w}");
    }
}

fn impact_warning(key: &str, impact: &Impact) -> Option<String> {
    (impact.recent_uses > 0).then(|| {
        // Stopped short at the daemon's scan bound: the count is a lower bound.
        let at_least = if impact.counted_back_to.is_some() {
            "at least "
        } else {
            ""
        };
        format!(
            "warning: {key} was used {at_least}{} times in the last {IMPACT_DAYS} days by {}",
            impact.recent_uses,
            accounts_summary(impact)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kms_shared::model::AccountUse;

    /// Used keys get a warning naming the accounts; unused keys none.
    #[test]
    fn warning_text() {
        let mut impact = Impact {
            key_tag: "t".into(),
            since: 0,
            recent_uses: 0,
            last_used_at: None,
            accounts: vec![],
            counted_back_to: None,
        };
        assert_eq!(impact_warning("k01", &impact), None);
        impact.recent_uses = 15;
        impact.accounts = vec![
            AccountUse {
                account: "alice".into(),
                uses: 12,
                last_used_at: 5,
            },
            AccountUse {
                account: "bob".into(),
                uses: 3,
                last_used_at: 4,
            },
        ];
        assert_eq!(
            impact_warning("k01", &impact).as_deref(),
            Some("warning: k01 was used 15 times in the last 30 days by alice (12), bob (3)")
        );
        // The daemon stopped reading history at its bound: a lower bound.
        impact.counted_back_to = Some(10);
        assert_eq!(
            impact_warning("k01", &impact).as_deref(),
            Some(
                "warning: k01 was used at least 15 times in the last 30 days by alice (12), bob (3)"
            )
        );
    }
}
