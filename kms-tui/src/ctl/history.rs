//! What happened: a key's history, and the live event stream.

use super::output::{self, event_record, to_json};
use super::{CmdResult, CtlError, Ctx, choice};
use clap::Args;
use kms_shared::client::Notification;
use kms_shared::model::{ACTIONS, Action, UnixMillis};
use kms_shared::protocol::{HISTORY_PAGE_MAX, HistoryQuery, ResultFilter, history_page_limit};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const RESULTS: [ResultFilter; 2] = [ResultFilter::Ok, ResultFilter::Error];

fn result_name(r: ResultFilter) -> &'static str {
    match r {
        ResultFilter::Ok => "ok",
        ResultFilter::Error => "error",
    }
}

fn parse_since(s: &str) -> Result<UnixMillis, String> {
    let t = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("not an RFC 3339 time such as 2024-05-01T00:00:00Z ({e})"))?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| "time out of range".into())
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Key tag or name
    pub key: String,
    /// At most N entries [default: the daemon's, 100]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: Option<u32>,
    /// Only this action: a key command's name (create, encrypt, rotate, grant…), auto-rotate
    /// or purge
    #[arg(long, value_name = "A", hide_possible_values = true, value_parser = choice(&ACTIONS, Action::as_str))]
    pub action: Option<Action>,
    /// Only successful calls, or only refused and failed ones
    #[arg(long, value_parser = choice(&RESULTS, result_name))]
    pub result: Option<ResultFilter>,
    /// Only entries at or after this time (RFC 3339)
    #[arg(long, value_name = "RFC3339", value_parser = parse_since)]
    pub since: Option<UnixMillis>,
    /// Only entries older than this one (its `seq`): the next page back, after the
    /// last entry shown
    #[arg(long, value_name = "SEQ")]
    pub before: Option<u64>,
}

pub async fn history(ctx: &mut Ctx, a: HistoryArgs) -> CmdResult {
    let mut query = HistoryQuery {
        key: a.key,
        limit: a.limit.map(|l| l.min(HISTORY_PAGE_MAX)),
        before_seq: a.before,
        action: a.action,
        result: a.result,
        since: a.since,
    };
    let mut entries = ctx.client.history(query.clone()).await?;
    // Limits above one page are served page by page, each older than the last.
    let want = a.limit.map_or(history_page_limit(None), |l| l as usize);
    let mut short = entries.len() < history_page_limit(query.limit);
    while !short && entries.len() < want {
        let page = (want - entries.len()).min(HISTORY_PAGE_MAX as usize);
        query.limit = u32::try_from(page).ok();
        query.before_seq = entries.last().map(|e| e.seq);
        let more = ctx.client.history(query.clone()).await?;
        short = more.len() < page;
        entries.extend(more);
    }
    // Cut at the limit: said, with the way to the next page, if there may be one, rather
    // than ending as if that were all. One page of one entry tells (a page the daemon
    // cut at its scan bound says older ones may match); it is not followed down a whole
    // history that has no more, and if it fails, the entries read still stand.
    let older = match entries.last() {
        Some(last) if !short => {
            query.limit = Some(1);
            query.before_seq = Some(last.seq);
            match ctx.client.history_page(query).await {
                Ok(next) if !next.entries.is_empty() || next.resume_before_seq.is_some() => {
                    Some(last.seq)
                }
                _ => None,
            }
        }
        _ => None,
    };
    ctx.out.emit_list(&entries, output::history_record, || {
        output::history_table(&entries)
    })?;
    if let Some(seq) = older {
        eprintln!(
            "kmsctl: {} entries shown; older ones with --before {seq} (or a larger \
             --limit)",
            entries.len()
        );
    }
    Ok(0)
}

/// Prints events as JSON lines (whatever `--json` says: the stream is for programs) until
/// Ctrl-C. The daemon going away is an error, so a supervising script can reconnect.
/// Once kmsd has acknowledged the subscription, a line on stderr says so: every change
/// made after it is printed (a script that acts then waits for it, or misses nothing).
pub async fn watch(ctx: &mut Ctx) -> CmdResult {
    let mut events = ctx.client.subscribe().await?;
    // Registered before the line that says it is watching: a script that waits for the
    // line and then interrupts gets the clean exit, not death by the signal.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    eprintln!("watching kmsd's events (Ctrl-C stops)");
    // Lines are written by a thread of their own. A reader that pauses (`| less`, a
    // script busy elsewhere) blocks that thread, not this runtime, whose other task keeps
    // reading kmsd's socket: events then wait in the client library and, past its bound,
    // are counted and printed as `{"lagged": N}`. Written from here, a pause of over
    // 5 minutes stopped the reading, and kmsd gave up on the connection.
    let (lines, mut to_write) = tokio::sync::mpsc::channel::<serde_json::Value>(WATCH_LINES);
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut out = crate::ctl::output::Printer::new(true);
        while let Some(line) = to_write.blocking_recv() {
            out.json_line(&line)?;
        }
        Ok(())
    });
    let ended = loop {
        let line = tokio::select! {
            _ = interrupt.recv() => break Ok(0),
            // The writer stopped (a closed pipe: `| head -n1`), without waiting for
            // another event to find it out.
            () = lines.closed() => break Ok(0),
            n = events.recv() => match n {
                Some(Notification::Event(e)) => to_json(event_record(&e)),
                Some(Notification::Lagged(missed)) => json!({ "lagged": missed }),
                // What a newer client library may add: not this version's to print.
                Some(_) => continue,
                None => break Err(CtlError::Connect("connection to kmsd closed".into())),
            },
        };
        // Refused: the writer stopped on an error, which is reported below.
        if lines.send(line).await.is_err() {
            break Ok(0);
        }
    };
    // The lines queued before the end go out first, and a write error is the result.
    drop(lines);
    match writer.join() {
        Ok(written) => written?,
        Err(_) => return Err(CtlError::Io("the thread writing events panicked".into())),
    }
    ended
}

/// Lines waiting for the writer thread of `watch`, beyond the client library's own queue.
const WATCH_LINES: usize = 256;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn since_parses_rfc3339_to_millis() {
        assert_eq!(parse_since("1970-01-01T00:00:01.25Z"), Ok(1250));
        assert_eq!(
            parse_since("2024-01-01T09:00:00+09:00"),
            Ok(1_704_067_200_000)
        );
        assert!(parse_since("2024-01-01").is_err());
    }
}
