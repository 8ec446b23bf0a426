//! A byte stream carried over the control socket beside the JSON request and reply lines:
//! chunks of `len u32 | bytes`, ended by a zero length. `send` through a daemon writes the
//! stream to the client this way, `receive` through a daemon reads it from the client, and
//! the JSON reply line follows the end, so the client learns how the operation ended.

use std::io::{self, Read, Write};

/// Largest chunk written: what the client copies at a time.
pub const CHUNK: usize = 1 << 20;

/// Frames every write as one chunk (large writes split); `finish` writes the end.
pub struct FrameWriter<W: Write> {
    inner: W,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> FrameWriter<W> {
        FrameWriter { inner }
    }

    /// Write the end marker and return the inner writer.
    ///
    /// # Errors
    /// Write failures.
    pub fn finish(mut self) -> io::Result<W> {
        self.inner.write_all(&0u32.to_le_bytes())?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for FrameWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min(CHUNK);
        self.inner.write_all(&(n as u32).to_le_bytes())?;
        self.inner.write_all(&buf[..n])?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads the chunks back as one byte stream, ending at the end marker.
pub struct FrameReader<R: Read> {
    inner: R,
    left: usize,
    ended: bool,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner,
            left: 0,
            ended: false,
        }
    }

    /// Skip to the end marker (what the other side still sends after an early error).
    ///
    /// # Errors
    /// Read failures.
    pub fn drain(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; CHUNK];
        while self.read(&mut buf)? > 0 {}
        Ok(())
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for FrameReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ended || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut len = [0u8; 4];
            match self.inner.read_exact(&mut len) {
                Ok(()) => {}
                // The other side went away without an end marker: the stream just ends
                // here, and the stream's own end record tells a cut stream from a whole one.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.ended = true;
                    return Ok(0);
                }
                Err(e) => return Err(e),
            }
            let n = u32::from_le_bytes(len) as usize;
            if n == 0 {
                self.ended = true;
                return Ok(0);
            }
            if n > CHUNK {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("frame of {n} bytes"),
                ));
            }
            self.left = n;
        }
        let want = buf.len().min(self.left);
        let got = self.inner.read(&mut buf[..want])?;
        if got == 0 {
            self.ended = true;
            return Ok(0);
        }
        self.left -= got;
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i % 251) as u8).collect();
        let mut w = FrameWriter::new(Vec::new());
        w.write_all(&data).unwrap();
        let mut wire = w.finish().unwrap();
        wire.extend_from_slice(b"{\"reply\"}\n");
        let mut r = FrameReader::new(&wire[..]);
        let mut back = Vec::new();
        r.read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
        let mut rest = String::new();
        r.into_inner().read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "{\"reply\"}\n");
    }
}
