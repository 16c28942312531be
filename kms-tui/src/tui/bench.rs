//! `kms-tui --bench-frames N`: the frame time with 100,000 keys, measured off-screen
//! (TestBackend), for the performance note. Not a test: timings do not belong in
//! pass/fail checks.

use std::time::{Duration, Instant};

use kms_shared::model::KeyInfo;
use ratatui::Terminal;
use ratatui::backend::TestBackend;

use super::action::Action;
use super::app::{App, Conn};
use super::fake;
use super::ui;
use super::update::update;

const KEYS: usize = 100_000;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn p99(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get((v.len() * 99 / 100).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

pub fn run(frames: usize) {
    let frames = frames.max(1);
    let keys = fake::many(KEYS);
    for (w, h) in [(80u16, 24u16), (160, 40)] {
        match measure(&keys, w, h, frames) {
            Ok(line) => println!("{line}"),
            Err(e) => println!("{w}x{h}: {e}"),
        }
    }
}

fn measure(keys: &[KeyInfo], w: u16, h: u16, frames: usize) -> Result<String, String> {
    let mut app = App::new((w, h));
    app.conn = Conn::Connected {
        daemon_version: "bench".into(),
    };
    let t = Instant::now();
    update(&mut app, Action::KeysLoaded(Ok(keys.to_vec())));
    let load = t.elapsed();
    let mut term = Terminal::new(TestBackend::new(w, h)).map_err(|e| e.to_string())?;

    // Scrolling: one update and one full frame per step, alternating page and line moves.
    let mut scroll = Vec::with_capacity(frames);
    for i in 0..frames {
        let t = Instant::now();
        let a = if i % 2 == 0 {
            Action::PageDown
        } else {
            Action::Down
        };
        update(&mut app, a);
        term.draw(|f| ui::draw(f, &app))
            .map_err(|e| e.to_string())?;
        scroll.push(t.elapsed());
    }

    // Filtering: each keystroke recomputes the index over all keys, then draws.
    update(&mut app, Action::StartFilter);
    let typed = "key-0123";
    let mut filter = Vec::with_capacity(frames);
    while filter.len() < frames {
        for c in typed.chars() {
            let t = Instant::now();
            update(&mut app, Action::Char(c));
            term.draw(|f| ui::draw(f, &app))
                .map_err(|e| e.to_string())?;
            filter.push(t.elapsed());
        }
        for _ in typed.chars() {
            let t = Instant::now();
            update(&mut app, Action::Backspace);
            term.draw(|f| ui::draw(f, &app))
                .map_err(|e| e.to_string())?;
            filter.push(t.elapsed());
        }
    }
    Ok(format!(
        "{w}x{h}, {KEYS} keys, {frames} frames: scroll frame median {:.3} ms (p99 {:.3} ms); \
         filter keystroke+frame median {:.3} ms (p99 {:.3} ms); initial sort+index {:.1} ms",
        ms(median(&mut scroll)),
        ms(p99(&mut scroll)),
        ms(median(&mut filter)),
        ms(p99(&mut filter)),
        ms(load),
    ))
}
