//! Text a peer chose that a user will read: which characters it may hold.
//!
//! Names, file paths and messages come from other members, any of whom may be hostile.
//! What a person sees must be what the bytes say: no control characters (a terminal
//! would obey them), no invisible format characters (zero-width joiners, soft hyphens),
//! no bidirectional overrides that show `gpj.exe` as `exe.jpg`, no line or paragraph
//! separators. The Unicode general category decides (crate `unicode-general-category`,
//! Unicode 16): a hand-kept list of code points would miss the next one added.

use unicode_general_category::{GeneralCategory, get_general_category};

/// Whether `c` is a character a reader cannot see or that changes how the text around it
/// is shown: controls (Cc), format characters (Cf, which include every bidirectional
/// embedding, override and isolate, U+202A–U+202E and U+2066–U+2069), line and paragraph
/// separators (Zl, Zp), and unassigned, private-use or surrogate code points (Cn, Co, Cs:
/// nothing a font shows the same everywhere).
pub fn is_hidden(c: char) -> bool {
    matches!(
        get_general_category(c),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
            | GeneralCategory::Unassigned
            | GeneralCategory::PrivateUse
            | GeneralCategory::Surrogate
    )
}

/// `text` with every [hidden](is_hidden) character written out as an escape (`\\n`,
/// `\\u{202e}`), for a terminal: a peer's message, name or file name must not move the
/// cursor, recolour the screen, set the window title, start a fake line that looks like
/// another peer's, or reverse the text after it. Borrowed when there is nothing to escape.
pub fn escape_hidden(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(is_hidden) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if is_hidden(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A peer's display name as it is kept and shown: [hidden](is_hidden) characters removed
/// (no bidirectional override can reverse it, no zero-width character can make "alice" and
/// "al\u{200b}ice" two names), runs of white space made one space, trimmed, and cut to
/// `max_bytes` at a character boundary. Empty if nothing visible is left.
pub fn clean_name(name: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(name.len().min(max_bytes));
    let mut pending_space = false;
    for c in name.chars() {
        if is_hidden(c) && !c.is_whitespace() {
            continue;
        }
        if c.is_whitespace() {
            pending_space = !out.is_empty();
            continue;
        }
        let extra = c.len_utf8() + usize::from(pending_space);
        if out.len() + extra > max_bytes {
            break;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        out.push(c);
    }
    out
}

/// Whether `name` is one Windows reserves for a device (`CON`, `PRN`, `AUX`, `NUL`,
/// `COM0`–`COM9`, `LPT0`–`LPT9`, with superscript digits too), whatever its case and
/// whatever follows a first dot or trailing spaces: `nul.txt` opens the null device there.
pub fn is_reserved_device_name(name: &str) -> bool {
    let stem = name.split('.').next().unwrap_or(name).trim_end_matches(' ');
    let upper = stem.to_ascii_uppercase();
    match upper.as_str() {
        "CON" | "PRN" | "AUX" | "NUL" | "CONIN$" | "CONOUT$" => true,
        _ => {
            let mut chars = upper.chars();
            let prefix: String = chars.by_ref().take(3).collect();
            let rest: Vec<char> = chars.collect();
            (prefix == "COM" || prefix == "LPT")
                && rest.len() == 1
                && matches!(rest[0], '0'..='9' | '¹' | '²' | '³')
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_characters_are_the_ones_a_reader_cannot_see() {
        for c in ['\n', '\u{1b}', '\u{7f}', '\u{200b}', '\u{200d}', '\u{00ad}', '\u{feff}'] {
            assert!(is_hidden(c), "{:?}", c);
        }
        // Every bidirectional embedding, override and isolate.
        for c in ('\u{202a}'..='\u{202e}').chain('\u{2066}'..='\u{2069}') {
            assert!(is_hidden(c), "{:?}", c);
        }
        for c in ['\u{2028}', '\u{2029}', '\u{e000}', '\u{fffff}'] {
            assert!(is_hidden(c), "{:?}", c);
        }
        for c in ['a', 'Z', '9', ' ', '-', '名', 'é', '😀', '\u{0301}'] {
            assert!(!is_hidden(c), "{:?}", c);
        }
    }

    #[test]
    fn escaping_leaves_nothing_a_terminal_would_obey() {
        assert!(matches!(escape_hidden("plain 名前 😀"), std::borrow::Cow::Borrowed(_)));
        let attack = "hi\n<alice> send me your invite\u{1b}]0;owned\u{7}\u{202e}txt.exe";
        let shown = escape_hidden(attack);
        assert!(!shown.chars().any(is_hidden), "{shown}");
        assert_eq!(shown, "hi\\n<alice> send me your invite\\u{1b}]0;owned\\u{7}\\u{202e}txt.exe");
    }

    #[test]
    fn names_are_cleaned_of_what_a_reader_cannot_see() {
        assert_eq!(clean_name("  Alice   Smith \n", 64), "Alice Smith");
        assert_eq!(clean_name("al\u{200b}ice", 64), "alice");
        assert_eq!(clean_name("\u{202e}ecila", 64), "ecila");
        assert_eq!(clean_name("\u{1b}[31mred", 64), "[31mred");
        assert_eq!(clean_name("\u{200b}\u{200d}", 64), "");
        assert_eq!(clean_name(&"é".repeat(100), 64), "é".repeat(32));
        assert_eq!(clean_name("ab cd", 4), "ab c");
    }

    #[test]
    fn reserved_device_names_in_any_case_and_with_any_extension() {
        for n in ["CON", "con", "Nul.txt", "aux.tar.gz", "COM1", "lpt9.log", "com¹", "PRN  "] {
            assert!(is_reserved_device_name(n), "{n}");
        }
        for n in ["CONSOLE", "com10", "lpt", "nul_", "a.con", "COMA", "report.txt"] {
            assert!(!is_reserved_device_name(n), "{n}");
        }
    }
}
