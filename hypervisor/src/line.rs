//! Console line editor: turns the raw bytes of a serial line into command
//! lines, with backspace, Ctrl-C / Ctrl-U, and a hard length limit.
//!
//! It never panics and never grows without bound: an overlong line or one
//! with binary bytes is consumed up to its end and reported as one error, so
//! garbage on the wire changes nothing but produces one clear reply.

use alloc::string::String;

/// Longest accepted command line, in bytes.
pub const MAX_LINE: usize = 256;

/// What a byte completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A complete line (without the terminator), printable ASCII only.
    Line(String),
    /// The line was longer than [`MAX_LINE`] bytes.
    TooLong,
    /// The line held a byte that is neither printable ASCII nor an editing key.
    Binary(u8),
    /// Ctrl-C: the line was discarded.
    Cancelled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Escape {
    None,
    /// Saw ESC.
    Start,
    /// Inside a CSI sequence (`ESC [` ... final byte).
    Csi,
    /// After `ESC O` (SS3, as some terminals send arrow keys): one more byte.
    Ss3,
}

/// Line editor state. Feed it bytes; it tells you what to echo and when a
/// line is complete.
#[derive(Debug)]
pub struct LineEditor {
    buf: String,
    too_long: bool,
    bad_byte: Option<u8>,
    escape: Escape,
    last_was_cr: bool,
}

impl Default for LineEditor {
    fn default() -> Self {
        Self::new()
    }
}

impl LineEditor {
    /// An empty editor.
    pub fn new() -> Self {
        LineEditor {
            buf: String::with_capacity(MAX_LINE),
            too_long: false,
            bad_byte: None,
            escape: Escape::None,
            last_was_cr: false,
        }
    }

    /// Feeds one byte. Bytes to echo back (for an interactive terminal) are
    /// appended to `echo`; a finished line is returned.
    pub fn feed(&mut self, byte: u8, echo: &mut String) -> Option<Event> {
        let after_cr = core::mem::replace(&mut self.last_was_cr, false);
        if byte < 0x20 {
            // Control bytes act even inside an escape sequence, as on a
            // terminal, and end it: a line end or Ctrl-C after a stray ESC
            // was swallowed, merging two commands into one line.
            self.escape = Escape::None;
        }
        match self.escape {
            Escape::Start => {
                self.escape = match byte {
                    b'[' => Escape::Csi,
                    b'O' => Escape::Ss3,
                    _ => Escape::None,
                };
                return None;
            }
            Escape::Csi => {
                if (0x40..=0x7e).contains(&byte) {
                    self.escape = Escape::None;
                }
                return None;
            }
            Escape::Ss3 => {
                self.escape = Escape::None;
                return None;
            }
            Escape::None => {}
        }
        match byte {
            b'\n' if after_cr => None, // the LF of a CR LF pair
            b'\r' | b'\n' => {
                self.last_was_cr = byte == b'\r';
                echo.push_str("\r\n");
                Some(self.finish())
            }
            0x08 | 0x7f => {
                if !self.too_long && self.bad_byte.is_none() && self.buf.pop().is_some() {
                    echo.push_str("\x08 \x08");
                }
                None
            }
            0x03 => {
                echo.push_str("^C\r\n");
                self.reset();
                Some(Event::Cancelled)
            }
            0x15 => {
                for _ in 0..self.buf.len() {
                    echo.push_str("\x08 \x08");
                }
                self.reset();
                None
            }
            0x1b => {
                self.escape = Escape::Start;
                None
            }
            0x20..=0x7e => {
                if self.buf.len() >= MAX_LINE {
                    self.too_long = true;
                } else if !self.too_long {
                    self.buf.push(char::from(byte));
                    echo.push(char::from(byte));
                }
                None
            }
            other => {
                self.bad_byte.get_or_insert(other);
                None
            }
        }
    }

    fn finish(&mut self) -> Event {
        let event = if self.too_long {
            Event::TooLong
        } else if let Some(b) = self.bad_byte {
            Event::Binary(b)
        } else {
            Event::Line(core::mem::replace(&mut self.buf, String::with_capacity(MAX_LINE)))
        };
        self.reset();
        event
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.too_long = false;
        self.bad_byte = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn feed_all(ed: &mut LineEditor, bytes: &[u8]) -> Vec<Event> {
        let mut echo = String::new();
        bytes.iter().filter_map(|&b| ed.feed(b, &mut echo)).collect()
    }

    fn line(s: &str) -> Event {
        Event::Line(String::from(s))
    }

    #[test]
    fn crlf_and_lf_each_end_one_line() {
        let mut ed = LineEditor::new();
        assert_eq!(feed_all(&mut ed, b"help\r\nmem\nup\r"), [line("help"), line("mem"), line("up")]);
    }

    #[test]
    fn blank_lines_are_empty_lines() {
        let mut ed = LineEditor::new();
        assert_eq!(feed_all(&mut ed, b"\n\r\n"), [line(""), line("")]);
    }

    #[test]
    fn backspace_and_delete_erase() {
        let mut ed = LineEditor::new();
        let mut echo = String::new();
        for &b in b"helx\x08p\x7f\x7fp\x08\x08\x08\x08\x08lp" {
            assert!(ed.feed(b, &mut echo).is_none());
        }
        assert_eq!(ed.feed(b'\n', &mut echo), Some(line("lp")));
        assert!(echo.contains("\x08 \x08"));
    }

    #[test]
    fn ctrl_c_cancels_and_ctrl_u_clears() {
        let mut ed = LineEditor::new();
        assert_eq!(feed_all(&mut ed, b"abc\x03def\x15ghi\n"), [Event::Cancelled, line("ghi")]);
    }

    #[test]
    fn ansi_escape_sequences_are_ignored() {
        let mut ed = LineEditor::new();
        assert_eq!(feed_all(&mut ed, b"he\x1b[Allo\x1b[1;5C\n"), [line("hello")]);
    }

    #[test]
    fn control_bytes_end_escape_sequences_and_still_act() {
        // Before: the line end after a stray ESC was eaten, giving one
        // line "versionversion"; inside a CSI it was eaten too, and the
        // next letter ended the sequence ("ersion").
        let mut ed = LineEditor::new();
        assert_eq!(feed_all(&mut ed, b"version\x1b\nversion\n"), [line("version"), line("version")]);
        assert_eq!(feed_all(&mut ed, b"\x1b[1;\nmem\n"), [line(""), line("mem")]);
        assert_eq!(feed_all(&mut ed, b"abc\x1b\x03"), [Event::Cancelled]);
        // SS3 arrow keys (ESC O A) insert nothing.
        assert_eq!(feed_all(&mut ed, b"me\x1bOAm\n"), [line("mem")]);
    }

    #[test]
    fn overlong_line_is_one_error_then_editor_recovers() {
        let mut ed = LineEditor::new();
        let mut input = [b'a'; MAX_LINE + 50].to_vec();
        input.extend_from_slice(b"\nok\n");
        assert_eq!(feed_all(&mut ed, &input), [Event::TooLong, line("ok")]);
        let exact = [b'b'; MAX_LINE];
        let mut input = exact.to_vec();
        input.push(b'\n');
        assert_eq!(feed_all(&mut ed, &input).len(), 1);
        assert!(matches!(&feed_all(&mut ed, &input)[0], Event::Line(l) if l.len() == MAX_LINE));
    }

    #[test]
    fn binary_bytes_reject_the_whole_line() {
        let mut ed = LineEditor::new();
        assert_eq!(feed_all(&mut ed, b"ver\x00\xffsion\nversion\n"), [Event::Binary(0), line("version")]);
    }

    #[test]
    fn random_garbage_never_yields_a_long_or_unprintable_line() {
        let mut ed = LineEditor::new();
        let mut x: u32 = 12345;
        let mut echo = String::new();
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if let Some(Event::Line(l)) = ed.feed(x.to_le_bytes()[0], &mut echo) {
                assert!(l.len() <= MAX_LINE);
                assert!(l.bytes().all(|b| (0x20..=0x7e).contains(&b)));
            }
            echo.clear();
        }
    }
}
