//! Lines read from a pipe another process writes (a step, the zygote, the bridge), with a bound
//! on each line. `AsyncBufReadExt::lines` buffers a line until its newline, so one line with
//! no newline grows without limit; it also ends at the first invalid UTF-8 byte, after which
//! nobody drains the pipe. Here a line keeps at most `limit` bytes, the rest of it up to the
//! newline is read and discarded (counted), and invalid UTF-8 is replaced.
//!
//! Not `tokio_util::codec::LinesCodec::new_with_max_length`: it discards an over-long line
//! entirely (an error, then nothing of it), where a log or a stderr tail wants its start, and
//! it fails on invalid UTF-8.

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Bound of a line of output meant for people (step output, zygote and bridge logs).
pub(crate) const MAX_LINE_BYTES: usize = 8 * 1024;

/// One line, without its newline (nor a `\r` before it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    /// At most the reader's limit of bytes from the start of the line.
    pub text: String,
    /// Bytes of the line cut after `text` (0: the whole line).
    pub truncated: usize,
}

impl Line {
    /// The line with at most `limit` bytes of text (cut at a character boundary).
    pub(crate) fn cut_to(mut self, limit: usize) -> Line {
        if self.text.len() > limit {
            let mut cut = limit;
            while !self.text.is_char_boundary(cut) {
                cut -= 1;
            }
            self.truncated += self.text.len() - cut;
            self.text.truncate(cut);
        }
        self
    }

    /// The text, followed by a marker saying how much was cut when it was.
    pub(crate) fn marked(self) -> String {
        if self.truncated == 0 {
            self.text
        } else {
            format!("{} …[truncated {} bytes]", self.text, self.truncated)
        }
    }
}

/// A line that may raise its own bound: once a line fills the base limit, `long` is asked
/// about the bytes kept so far, and when it says yes the line may grow to `limit`.
#[derive(Clone, Copy)]
pub(crate) struct LongLines {
    pub limit: usize,
    pub long: fn(&[u8]) -> bool,
}

/// Reads bounded lines from `R`. Cancel-safe: a line read in part is kept for the next call.
pub(crate) struct BoundedLines<R> {
    reader: BufReader<R>,
    limit: usize,
    long: Option<LongLines>,
    /// The line being read: bytes kept, bytes cut, its limit, whether anything was read.
    kept: Vec<u8>,
    truncated: usize,
    line_limit: usize,
    started: bool,
}

impl<R: AsyncRead + Unpin> BoundedLines<R> {
    /// Lines of at most `limit` bytes.
    pub(crate) fn new(reader: R, limit: usize) -> Self {
        Self {
            reader: BufReader::new(reader),
            limit,
            long: None,
            kept: Vec::new(),
            truncated: 0,
            line_limit: limit,
            started: false,
        }
    }

    /// Lines of at most `limit` bytes, except those that `long` admits to its own limit.
    pub(crate) fn with_long_lines(reader: R, limit: usize, long: LongLines) -> Self {
        Self {
            long: Some(long),
            ..Self::new(reader, limit)
        }
    }

    /// The next line; `None` at the end of the input. A last line without a newline counts.
    pub(crate) async fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                if !self.started {
                    return Ok(None);
                }
                return Ok(Some(self.finish()));
            }
            self.started = true;
            let newline = available.iter().position(|&b| b == b'\n');
            let chunk = &available[..newline.unwrap_or(available.len())];
            let used = chunk.len() + usize::from(newline.is_some());
            let mut rest = chunk;
            while !rest.is_empty() {
                if self.kept.len() >= self.line_limit
                    && !raise_limit(&mut self.line_limit, self.long, &self.kept)
                {
                    self.truncated += rest.len();
                    break;
                }
                let take = rest.len().min(self.line_limit - self.kept.len());
                self.kept.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
            }
            self.reader.consume(used);
            if newline.is_some() {
                return Ok(Some(self.finish()));
            }
        }
    }

    fn finish(&mut self) -> Line {
        let mut kept = std::mem::take(&mut self.kept);
        let mut truncated = std::mem::take(&mut self.truncated);
        self.line_limit = self.limit;
        self.started = false;
        if truncated == 0 && kept.last() == Some(&b'\r') {
            kept.pop();
        }
        if truncated > 0 {
            // The cut may split a character: leave its first bytes out with the rest.
            let partial = incomplete_char_tail(&kept);
            kept.truncate(kept.len() - partial);
            truncated += partial;
        }
        let text = String::from_utf8(kept)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        Line { text, truncated }
    }
}

/// Whether a line at its limit, `kept` so far, may grow to the long limit (then raised).
fn raise_limit(line_limit: &mut usize, long: Option<LongLines>, kept: &[u8]) -> bool {
    match long {
        Some(long) if *line_limit < long.limit && (long.long)(kept) => {
            *line_limit = long.limit;
            true
        }
        _ => false,
    }
}

/// How many bytes at the end of `bytes` begin a UTF-8 character that they do not complete.
fn incomplete_char_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(4) {
        let byte = bytes[bytes.len() - back];
        if byte & 0xC0 == 0x80 {
            continue; // a continuation byte: the character starts further back
        }
        let needs = match byte {
            0xF0.. => 4,
            0xE0.. => 3,
            0xC0.. => 2,
            _ => 1,
        };
        return if needs > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(input: Vec<u8>, limit: usize) -> Vec<Line> {
        let mut lines = BoundedLines::new(&input[..], limit);
        let mut out = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            out.push(line);
        }
        out
    }

    fn line(text: &str, truncated: usize) -> Line {
        Line {
            text: text.into(),
            truncated,
        }
    }

    #[tokio::test]
    async fn short_lines_come_whole() {
        let lines = read_all(b"one\r\ntwo\n\nlast".to_vec(), 16).await;
        assert_eq!(
            lines,
            [line("one", 0), line("two", 0), line("", 0), line("last", 0)]
        );
        assert!(read_all(Vec::new(), 16).await.is_empty());
    }

    #[tokio::test]
    async fn a_line_of_exactly_the_limit_is_whole() {
        let mut input = vec![b'a'; MAX_LINE_BYTES];
        input.push(b'\n');
        input.extend(vec![b'b'; MAX_LINE_BYTES + 1]);
        let lines = read_all(input, MAX_LINE_BYTES).await;
        assert_eq!(lines.len(), 2);
        assert_eq!(
            (lines[0].text.len(), lines[0].truncated),
            (MAX_LINE_BYTES, 0)
        );
        assert_eq!(
            (lines[1].text.len(), lines[1].truncated),
            (MAX_LINE_BYTES, 1)
        );
    }

    #[tokio::test]
    async fn a_ten_megabyte_line_keeps_its_start_and_says_how_much_was_cut() {
        const TEN_MB: usize = 10 * 1024 * 1024;
        // Without a newline: the end of the input ends the line.
        let lines = read_all(vec![b'x'; TEN_MB], MAX_LINE_BYTES).await;
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].text, "x".repeat(MAX_LINE_BYTES));
        assert_eq!(lines[0].truncated, TEN_MB - MAX_LINE_BYTES);
        assert!(lines[0]
            .clone()
            .marked()
            .ends_with(&format!(" …[truncated {} bytes]", TEN_MB - MAX_LINE_BYTES)));
        // With a newline: the next line is read as usual.
        let mut input = vec![b'x'; TEN_MB];
        input.extend(b"\nafter\n");
        let lines = read_all(input, MAX_LINE_BYTES).await;
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].truncated, TEN_MB - MAX_LINE_BYTES);
        assert_eq!(lines[1], line("after", 0));
    }

    #[tokio::test]
    async fn a_character_split_at_the_cut_is_left_out_whole() {
        // "é" is two bytes: the limit falls between them.
        let lines = read_all("aé and more".as_bytes().to_vec(), 2).await;
        assert_eq!(lines, [line("a", "é and more".len())]);
        // "€" is three bytes, "😀" four.
        for text in ["ab€€", "ab😀😀"] {
            for limit in 2..text.len() {
                let lines = read_all(text.as_bytes().to_vec(), limit).await;
                let kept = &lines[0].text;
                assert!(text.starts_with(kept.as_str()), "{kept:?}");
                assert_eq!(kept.len() + lines[0].truncated, text.len());
            }
        }
        // Invalid UTF-8 is replaced, and the lines after it are still read.
        let lines = read_all(b"bad \xff byte\nnext\n".to_vec(), 64).await;
        assert_eq!(lines, [line("bad \u{fffd} byte", 0), line("next", 0)]);
    }

    #[tokio::test]
    async fn a_long_line_that_qualifies_may_grow_to_its_own_limit() {
        let long = LongLines {
            limit: 64,
            long: |kept| kept.starts_with(b"{"),
        };
        let input = format!("{{{}\n{}\n", "e".repeat(99), "p".repeat(99));
        let mut lines = BoundedLines::with_long_lines(input.as_bytes(), 8, long);
        let event = lines.next_line().await.unwrap().unwrap();
        assert_eq!((event.text.len(), event.truncated), (64, 36));
        let plain = lines.next_line().await.unwrap().unwrap();
        assert_eq!((plain.text.len(), plain.truncated), (8, 91));
        // Cut further later, at a character boundary.
        let cut = line("aé€", 1).cut_to(2);
        assert_eq!(cut, line("a", 6));
        assert_eq!(line("short", 0).cut_to(8), line("short", 0));
    }
}
