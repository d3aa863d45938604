//! The digest that names a directory's config: the sum, modulo 2^256, of the SHA-256 of each
//! file's line `SHA256  NAME\n` as `sha256sum` prints it (SHA256 that of the file's version in
//! force), over the files in force. A sum rather than a hash of the whole listing so that a
//! change of one file costs one line (taken out, the new one added), not a hash of 200,000
//! lines; and it does not depend on the order the files are listed in, so an operator's
//! `sha256sum` over `find`'s output gives it as well (the README says how).

use crate::config::sha256;

/// A number modulo 2^256, in 64-bit limbs, least significant first.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Digest([u64; 4]);

impl Digest {
    /// A file whose `line` (see `Line::of`) is that of its version in force serves from now on.
    pub(super) fn add(&mut self, line: Line) {
        let mut carry = false;
        for (limb, add) in self.0.iter_mut().zip(line.0) {
            let (s, c1) = limb.overflowing_add(add);
            let (s, c2) = s.overflowing_add(u64::from(carry));
            *limb = s;
            carry = c1 || c2;
        }
    }

    /// A file whose version in force had `line` no longer serves.
    pub(super) fn sub(&mut self, line: Line) {
        let mut borrow = false;
        for (limb, sub) in self.0.iter_mut().zip(line.0) {
            let (d, b1) = limb.overflowing_sub(sub);
            let (d, b2) = d.overflowing_sub(u64::from(borrow));
            *limb = d;
            borrow = b1 || b2;
        }
    }

    /// As 64 hex digits, most significant first (as a SHA-256 is written).
    pub(super) fn hex(&self) -> String {
        self.0.iter().rev().map(|l| format!("{l:016x}")).collect()
    }
}

/// The SHA-256 of a file's `sha256sum` line, as a number (big-endian, as its hex reads): what
/// the file adds to the digest. Worked out where the file is read (on the reading threads at
/// start: a hash of each of 200,000 lines there, not on the one thread taking files in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Line([u64; 4]);

impl Line {
    /// The line of the file `name` whose contents hash to `sha`.
    pub(super) fn of(sha: &[u8; 32], name: &str) -> Line {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 64];
        for (pair, b) in hex.chunks_exact_mut(2).zip(sha) {
            pair[0] = DIGITS[usize::from(b >> 4)];
            pair[1] = DIGITS[usize::from(b & 15)];
        }
        Line::new(&hex, name)
    }

    /// The line `SHA  NAME\n` (`sha`: the file's hash in hex).
    pub(super) fn new(sha: &[u8], name: &str) -> Line {
        // On the stack for any file name (255 bytes at most): one allocation less for each of
        // 200,000 files at start.
        let mut inline = [0u8; 64 + 2 + 255 + 1];
        let mut heap = Vec::new();
        let len = sha.len() + name.len() + 3;
        let text = if len <= inline.len() {
            &mut inline[..len]
        } else {
            heap.resize(len, 0);
            &mut heap[..]
        };
        let (s, rest) = text.split_at_mut(sha.len());
        s.copy_from_slice(sha);
        let (sep, rest) = rest.split_at_mut(2);
        sep.copy_from_slice(b"  ");
        let (n, nl) = rest.split_at_mut(name.len());
        n.copy_from_slice(name.as_bytes());
        nl[0] = b'\n';
        let d = sha256::digest(text);
        let mut limbs = [0u64; 4];
        for (i, limb) in limbs.iter_mut().enumerate() {
            let at = 32 - 8 * (i + 1);
            let mut b = [0u8; 8];
            b.copy_from_slice(&d[at..at + 8]);
            *limb = u64::from_be_bytes(b);
        }
        Line(limbs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_is_its_lines_hash_and_a_sum_undoes() {
        let mut d = Digest::default();
        assert_eq!(d.hex(), "0".repeat(64));
        d.add(Line::new(b"ab", "a.json"));
        assert_eq!(d.hex(), sha256::hex(b"ab  a.json\n"));
        d.add(Line::new(b"cd", "b.json"));
        let mut other = Digest::default();
        other.add(Line::new(b"cd", "b.json"));
        other.add(Line::new(b"ab", "a.json"));
        assert_eq!(d, other, "in any order");
        d.sub(Line::new(b"ab", "a.json"));
        d.sub(Line::new(b"cd", "b.json"));
        assert_eq!(d, Digest::default());
    }

    #[test]
    fn a_line_of_hash_bytes_is_that_of_their_hex() {
        let sha = sha256::digest(b"{}");
        assert_eq!(
            Line::of(&sha, "a.json"),
            Line::new(sha256::hex(b"{}").as_bytes(), "a.json")
        );
    }

    #[test]
    fn carries_across_limbs() {
        let mut d = Digest([u64::MAX, u64::MAX, u64::MAX, 0]);
        let before = d;
        d.add(Line::new(b"x", "y"));
        d.sub(Line::new(b"x", "y"));
        assert_eq!(d, before);
    }
}
