//! Editing one line of text at a cursor, as the dialogs' text fields do: ←/→, Home/End
//! (ctrl-a/ctrl-e), Backspace, Delete, ctrl-u (clear to the start).
//!
//! The cursor is kept as the number of characters *after* it (`back`), so that 0 — the
//! default of every form — is the end of the text, where typing into a field starts.
//! Positions are counted in `char`s and turned into byte offsets only at char
//! boundaries, so no input can split a character.

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

/// What a field `width` cells wide shows of `text`, and the column of the cursor in it.
/// Text that does not fit shows the part around the cursor, a `…` marking what is cut
/// before it, and keeps a cell free for the cursor at the end. Widths are display cells:
/// a CJK character or an emoji takes two, so it is not counted as one and the text's end
/// pushed off the field.
pub fn view(text: &str, back: usize, width: usize) -> (String, u16) {
    use unicode_width::UnicodeWidthChar as _;
    if width < 2 {
        return (String::new(), 0);
    }
    let chars: Vec<char> = text.chars().collect();
    let cells = |c: &char| c.width().unwrap_or(0);
    let at = chars.len() - back.min(chars.len());
    let total: usize = chars.iter().map(cells).sum();
    let mut start = 0;
    if total >= width {
        // Leftwards from the cursor, as much as fits before its cell (the character
        // under it, or one past the end), and a cell for the `…` if anything is cut.
        let cursor = chars.get(at).map_or(1, cells).max(1);
        let budget = width.saturating_sub(cursor);
        let mut before = 0;
        start = at;
        while start > 0 && before + cells(&chars[start - 1]) <= budget {
            start -= 1;
            before += cells(&chars[start]);
        }
        while start > 0 && start < at && before + 1 > budget {
            before -= cells(&chars[start]);
            start += 1;
        }
    }
    let ellipsis = usize::from(start > 0);
    let column: usize = ellipsis + chars[start..at].iter().map(cells).sum::<usize>();
    let mut used = column;
    let mut end = at;
    while end < chars.len() && used + cells(&chars[end]) <= width {
        used += cells(&chars[end]);
        end += 1;
    }
    let shown: String = (start > 0)
        .then_some('…')
        .into_iter()
        .chain(chars[start..end].iter().copied())
        .collect();
    (shown, u16::try_from(column).unwrap_or(u16::MAX))
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
        // Wide characters count two cells: the end and the cursor stay in the field.
        assert_eq!(view("日日日日日END", 0, 8), ("…日END".into(), 6));
        assert_eq!(view("日日日日日END", 8, 8), ("日日日日".into(), 0));
        assert_eq!(view("日日日", 0, 8), ("日日日".into(), 6));
    }
}
