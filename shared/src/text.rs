//! Text from the daemon shown to a person. History holds program names, which any local
//! process chooses for itself, and account names and memos are free text: what a
//! terminal would act on must not reach it as it is.

/// The Unicode controls that reorder the text around them (embeddings, overrides,
/// isolates and the directional marks): a program named `a\u{202e}txt.exe` would read
/// `aexe.txt`, and a history row could be made to read backwards.
pub fn reorders_text(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    )
}

/// The line and paragraph separators, which are not control characters (`char::is_control`
/// is false for them) but end a line in some terminals and most editors and viewers.
pub fn breaks_line(c: char) -> bool {
    matches!(c, '\u{2028}' | '\u{2029}')
}

/// `s` made safe for a terminal: control characters (an escape sequence could rewrite
/// the screen, a carriage return hide a history entry), the line separators and the
/// controls that reorder text are shown escaped (`\u{1b}`), everything else as it is.
pub fn printable(s: &str) -> String {
    let escaped = |c: char| c.is_control() || breaks_line(c) || reorders_text(c);
    if !s.chars().any(escaped) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if escaped(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_reordering_are_escaped() {
        assert_eq!(printable("plain — ünïcode"), "plain — ünïcode");
        assert_eq!(
            printable("a\r\u{1b}[K\u{202e}x\u{200f}"),
            "a\\u{d}\\u{1b}[K\\u{202e}x\\u{200f}"
        );
        for c in ['\u{061c}', '\u{200e}', '\u{2066}', '\u{2069}', '\u{202a}'] {
            assert!(reorders_text(c), "{c:?}");
        }
        assert_eq!(printable("a\u{2028}b\u{2029}"), "a\\u{2028}b\\u{2029}");
        assert!(
            !reorders_text('\u{200d}'),
            "a zero-width joiner joins, it does not reorder"
        );
    }
}
