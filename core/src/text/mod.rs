//! Text a peer chose that a user will read: which characters it may hold.
//!
//! Names, file paths and messages come from other members, any of whom may be hostile.
//! What a person sees must be what the bytes say: no control characters (a terminal
//! would obey them), no invisible format characters (zero-width joiners, soft hyphens),
//! no bidirectional overrides that show `gpj.exe` as `exe.jpg`, no line or paragraph
//! separators. The Unicode general category decides (Unicode 16, as the crate
//! `unicode-general-category` gives it): a hand-kept list of code points would miss the next
//! one added.
//!
//! Only two sets of categories are asked about, so the module carries only those two sets
//! as sorted range boundaries (`tables.rs`, about 9 KB) instead of the crate's table of
//! every category (50 KB of the browser's module). `tables.rs` is generated from the crate
//! by a test, which also compares both answers for every `char`; the crate is a
//! dev-dependency only.

mod tables;

/// Whether `c` is a character a reader cannot see or that changes how the text around it
/// is shown: controls (Cc), format characters (Cf, which include every bidirectional
/// embedding, override and isolate, U+202A–U+202E and U+2066–U+2069), line and paragraph
/// separators (Zl, Zp), and unassigned, private-use or surrogate code points (Cn, Co, Cs:
/// nothing a font shows the same everywhere).
pub fn is_hidden(c: char) -> bool {
    in_ranges(tables::HIDDEN, c)
}

/// Whether `c` is a nonspacing mark (Mn): a combining accent drawn over the letter before it.
fn is_nonspacing_mark(c: char) -> bool {
    in_ranges(tables::NONSPACING_MARK, c)
}

/// Whether `c` lies in the set `bounds` describes: sorted code points where membership
/// flips, the set starting at each even index and ending before each odd one.
fn in_ranges(bounds: &[u32], c: char) -> bool {
    bounds.partition_point(|&b| b <= c as u32) % 2 == 1
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

/// What a name looks like, for telling look-alikes apart from names that differ: lower
/// case, combining marks dropped, fullwidth forms and the Cyrillic, Greek and Latin letters
/// that look like a Latin letter replaced by it, `0` and `1`/`i` by `o` and `l`, and
/// `rn`, `vv`, `cl` by `m`, `w`, `d`. Two names with one skeleton look alike.
///
/// Written by hand rather than with UTS #39's full confusables table (the
/// `unicode-security` crate): that table and the normalization it needs add about 98 KB
/// gzipped to the page, a third of its weight budget, for scripts a display name rarely
/// mixes. This covers what an impostor reaches for first: "аlice" with a Cyrillic "а",
/// "ALICE" in fullwidth, "a1ice", "rnallory".
pub fn skeleton(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars().flat_map(char::to_lowercase) {
        if is_nonspacing_mark(c) {
            continue;
        }
        out.push(latin_look_alike(base_letter(c)));
    }
    for (from, to) in [("rn", "m"), ("vv", "w"), ("cl", "d")] {
        out = out.replace(from, to);
    }
    out
}

/// Lower-case Latin-1 letters, U+00E0 to U+00FF, by their base letter (`_`: none).
const LATIN1_BASE: &[u8; 32] = b"aaaaaa_ceeeeiiiidnooooo_ouuuuy_y";
/// Latin Extended-A, U+0100 to U+017F, by their base letter (`_`: none).
const LATIN_EXT_A_BASE: &[u8; 128] = b"aaaaaaccccccccddddeeeeeeeeeegggggggghhhhiiiiiiiiii__jjkkkllllllllllnnnnnnnnnoooooo__rrrrrrssssssssttttttuuuuuuuuuuuuwwyyyzzzzzz_";

/// The letter an accented Latin letter is built on (`é` → `e`): what Unicode's
/// decomposition would give for these two blocks, without its tables.
fn base_letter(c: char) -> char {
    let base = match c as u32 {
        n @ 0xe0..=0xff => LATIN1_BASE[n as usize - 0xe0],
        n @ 0x100..=0x17f => LATIN_EXT_A_BASE[n as usize - 0x100],
        _ => b'_',
    };
    if base == b'_' { c } else { char::from(base) }
}

/// The Latin letter `c` (lower case) looks like, else `c`.
fn latin_look_alike(c: char) -> char {
    match c {
        // Fullwidth ASCII.
        '\u{ff01}'..='\u{ff5e}' => char::from_u32(c as u32 - 0xfee0)
            .map_or(c, |a| latin_look_alike(a.to_ascii_lowercase())),
        'а' | 'ɑ' | 'α' => 'a',
        'в' | 'β' | 'ь' => 'b',
        'с' | 'ϲ' => 'c',
        'ԁ' => 'd',
        'е' | 'ё' | 'ε' | 'є' => 'e',
        'ɡ' => 'g',
        'һ' | 'н' => 'h',
        'ј' | 'ϳ' => 'j',
        'к' | 'κ' => 'k',
        'i' | 'ı' | 'і' | 'ї' | 'ι' | 'ɩ' | 'ӏ' | 'ℓ' | '1' | '|' => 'l',
        'м' => 'm',
        'η' | 'п' => 'n',
        'о' | 'ο' | 'σ' | '0' | 'ө' => 'o',
        'р' | 'ρ' => 'p',
        'ԛ' => 'q',
        'г' => 'r',
        'ѕ' => 's',
        'т' | 'τ' => 't',
        'υ' | 'μ' => 'u',
        'ν' | 'ѵ' => 'v',
        'ԝ' | 'ω' | 'ш' => 'w',
        'х' | 'χ' => 'x',
        'у' | 'γ' | 'ү' => 'y',
        'ζ' => 'z',
        c => c,
    }
}

/// Whether two different names look alike (see [`skeleton`]).
pub fn looks_alike(a: &str, b: &str) -> bool {
    a != b && skeleton(a) == skeleton(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use unicode_general_category::{GeneralCategory, get_general_category};

    /// The range boundaries of the chars whose category `pick` accepts.
    fn bounds(pick: impl Fn(GeneralCategory) -> bool) -> Vec<u32> {
        let mut out = Vec::new();
        let mut inside = false;
        for n in 0..=(char::MAX as u32) {
            // Surrogates are no `char`; the crate calls them Surrogate (Cs).
            let here = char::from_u32(n)
                .map_or(pick(GeneralCategory::Surrogate), |c| pick(get_general_category(c)));
            if here != inside {
                out.push(n);
                inside = here;
            }
        }
        out
    }

    fn hidden_category(g: GeneralCategory) -> bool {
        matches!(
            g,
            GeneralCategory::Control
                | GeneralCategory::Format
                | GeneralCategory::LineSeparator
                | GeneralCategory::ParagraphSeparator
                | GeneralCategory::Unassigned
                | GeneralCategory::PrivateUse
                | GeneralCategory::Surrogate
        )
    }

    fn table_source(name: &str, doc: &str, bounds: &[u32]) -> String {
        let mut s = format!("/// {doc}\npub(super) const {name}: &[u32] = &[\n");
        for row in bounds.chunks(8) {
            let row: Vec<String> = row.iter().map(|b| format!("0x{b:x}")).collect();
            s.push_str(&format!("    {},\n", row.join(", ")));
        }
        s.push_str("];\n");
        s
    }

    /// `tables.rs` is what the crate says, and both sets answer as the crate does for every
    /// char. `WEFT_WRITE_TEXT_TABLES=1 cargo test -p weft-core text::` rewrites the file
    /// (after a new Unicode version of the crate).
    #[test]
    fn tables_give_the_crates_answer_for_every_char() {
        let hidden = bounds(hidden_category);
        let marks = bounds(|g| g == GeneralCategory::NonspacingMark);
        let source = format!(
            "//! Generated by `text::tests::tables_give_the_crates_answer_for_every_char` from\n\
             //! the crate `unicode-general-category`; do not edit.\n\n{}\n{}",
            table_source("HIDDEN", "Cc, Cf, Zl, Zp, Cn, Co and Cs.", &hidden),
            table_source("NONSPACING_MARK", "Mn.", &marks),
        );
        if std::env::var_os("WEFT_WRITE_TEXT_TABLES").is_some() {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/text/tables.rs");
            std::fs::write(path, &source).expect("write tables.rs");
        }
        assert_eq!(tables::HIDDEN, hidden.as_slice(), "run with WEFT_WRITE_TEXT_TABLES=1");
        assert_eq!(tables::NONSPACING_MARK, marks.as_slice(), "run with WEFT_WRITE_TEXT_TABLES=1");
        for c in (0..=(char::MAX as u32)).filter_map(char::from_u32) {
            let g = get_general_category(c);
            assert_eq!(is_hidden(c), hidden_category(g), "{c:?}");
            assert_eq!(is_nonspacing_mark(c), g == GeneralCategory::NonspacingMark, "{c:?}");
        }
    }

    #[test]
    fn look_alikes_share_a_skeleton_and_other_names_do_not() {
        for fake in ["аlice", "ALICE", "Alice", "a1ice", "alíce", "ａｌｉｃｅ", "aIice", "аӏісе"]
        {
            assert!(looks_alike(fake, "alice"), "{fake}");
        }
        assert!(looks_alike("rnallory", "mallory"));
        for other in ["alice", "alicia", "bob", "alice2", "al ice"] {
            assert!(!looks_alike(other, "alice"), "{other}");
        }
    }

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
