//! Editing one line of text at a cursor, as the dialogs' text fields do: ←/→, Home/End
//! (ctrl-a/ctrl-e), Backspace, Delete, ctrl-u (clear to the start).
//!
//! The cursor is kept as the number of characters *after* it (`back`), so that 0 — the
//! default of every form — is the end of the text, where typing into a field starts.
//! Positions are counted in `char`s and turned into byte offsets only at char
//! boundaries, so no input can split a character.

use ratatui::text::Span;

use super::app::MAX_INPUT;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    Insert(char),
    /// The character before the cursor.
    Backspace,
    /// The character after the cursor.
    Delete,
    Left,
    Right,
    Home,
    End,
    /// Everything before the cursor.
    ClearToStart,
}

/// Applies `edit` to `text` with the cursor `back` characters from its end. Returns
/// whether the text changed (a cursor move changes only `back`).
pub fn apply(text: &mut String, back: &mut usize, edit: Edit) -> bool {
    let len = text.chars().count();
    *back = (*back).min(len);
    let at = len - *back;
    match edit {
        Edit::Insert(c) => {
            // Past the rule's limit the validator already complains; this only keeps a
            // stuck key from growing a string without bound.
            if len >= MAX_INPUT {
                return false;
            }
            text.insert(byte_at(text, at), c);
            true
        }
        Edit::Backspace if at > 0 => {
            text.remove(byte_at(text, at - 1));
            true
        }
        Edit::Delete if *back > 0 => {
            text.remove(byte_at(text, at));
            *back -= 1;
            true
        }
        Edit::ClearToStart if at > 0 => {
            text.replace_range(..byte_at(text, at), "");
            true
        }
        Edit::Left => {
            *back = (*back + 1).min(len);
            false
        }
        Edit::Right => {
            *back = back.saturating_sub(1);
            false
        }
        Edit::Home => {
            *back = len;
            false
        }
        Edit::End => {
            *back = 0;
            false
        }
        Edit::Backspace | Edit::Delete | Edit::ClearToStart => false,
    }
}

/// The byte offset of the `n`th character (the length after the last).
fn byte_at(text: &str, n: usize) -> usize {
    text.char_indices().nth(n).map_or(text.len(), |(i, _)| i)
}

/// What a field `width` columns wide shows of `text`, and the column of the cursor in it.
/// Text that does not fit shows the part around the cursor, a `…` marking what is cut
/// before it, and keeps a cell free for the cursor at the end.
pub fn view(text: &str, back: usize, width: usize) -> (String, u16) {
    if width < 2 {
        return (String::new(), 0);
    }
    let chars: Vec<char> = text.chars().collect();
    let at = chars.len() - back.min(chars.len());
    let start = if chars.len() < width {
        0
    } else {
        // The cursor's cell is the last one the field has.
        (at + 1).saturating_sub(width)
    };
    let end = (start + width).min(chars.len());
    let mut shown: String = chars[start..end].iter().collect();
    if start > 0 {
        shown = std::iter::once('…')
            .chain(chars[start + 1..end].iter().copied())
            .collect();
    }
    let before: String = if start > 0 {
        std::iter::once('…')
            .chain(chars[start + 1..at].iter().copied())
            .collect()
    } else {
        chars[..at].iter().collect()
    };
    let column = u16::try_from(Span::raw(before).width()).unwrap_or(u16::MAX);
    (shown, column)
}

/// A field as [`view`] shows it: with the cursor where it is when `focused`, else from
/// its start.
pub fn field(text: &str, back: usize, focused: bool, width: usize) -> (String, u16) {
    let back = if focused { back } else { text.chars().count() };
    view(text, back, width)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str, edits: &[Edit]) -> (String, usize) {
        let mut t = text.to_string();
        let mut back = 0;
        for e in edits {
            apply(&mut t, &mut back, *e);
        }
        (t, back)
    }

    /// Moving, inserting and deleting in the middle.
    #[test]
    fn edits_at_the_cursor() {
        use Edit::*;
        assert_eq!(run("abc", &[Left, Insert('x')]), ("abxc".into(), 1));
        assert_eq!(run("abc", &[Home, Insert('x')]), ("xabc".into(), 3));
        assert_eq!(run("abc", &[Home, Right, Delete]), ("ac".into(), 1));
        assert_eq!(run("abc", &[Left, Backspace]), ("ac".into(), 1));
        assert_eq!(run("abc", &[Left, ClearToStart]), ("c".into(), 1));
        assert_eq!(run("abc", &[Home, End, Insert('d')]), ("abcd".into(), 0));
        // Nothing before the start or after the end.
        assert_eq!(run("abc", &[Delete]), ("abc".into(), 0));
        assert_eq!(
            run("abc", &[Home, Backspace, ClearToStart]),
            ("abc".into(), 3)
        );
        assert_eq!(
            run("ab", &[Left, Left, Left, Left, Insert('x')]),
            ("xab".into(), 2)
        );
        assert_eq!(run("ab", &[Right, Right, Insert('x')]), ("abx".into(), 0));
    }

    /// Characters of several bytes are moved over and removed whole.
    #[test]
    fn non_ascii_is_edited_by_character() {
        use Edit::*;
        assert_eq!(run("äöü", &[Left, Backspace]), ("äü".into(), 1));
        assert_eq!(run("日本語", &[Home, Right, Delete]), ("日語".into(), 1));
        assert_eq!(run("é🔑x", &[Left, Left, Insert('ß')]), ("éß🔑x".into(), 2));
        assert_eq!(run("é🔑x", &[Left, ClearToStart]), ("x".into(), 1));
    }

    /// The field shows the cursor's surroundings; the cursor column counts display cells.
    #[test]
    fn view_follows_the_cursor() {
        assert_eq!(view("abc", 0, 10), ("abc".into(), 3));
        assert_eq!(view("abc", 3, 10), ("abc".into(), 0));
        assert_eq!(view("abcdefghij", 0, 5), ("…hij".into(), 4));
        assert_eq!(view("abcdefghij", 10, 5), ("abcde".into(), 0));
        assert_eq!(view("abcdefghij", 6, 5), ("abcde".into(), 4));
        assert_eq!(view("abcdefghij", 5, 5), ("…cdef".into(), 4));
        assert_eq!(view("日本", 1, 10), ("日本".into(), 2));
        assert_eq!(view("", 0, 0), (String::new(), 0));
        assert_eq!(view("abc", 1, 1), (String::new(), 0));
        assert_eq!(view("abc", 0, 2), ("…".into(), 1));
    }
}
