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
    /// The file `name`, whose version in force hashes to `sha` (hex), is in force from now on.
    pub(super) fn add(&mut self, sha: &str, name: &str) {
        let line = line(sha, name);
        let mut carry = false;
        for (limb, add) in self.0.iter_mut().zip(line) {
            let (s, c1) = limb.overflowing_add(add);
            let (s, c2) = s.overflowing_add(u64::from(carry));
            *limb = s;
            carry = c1 || c2;
        }
    }

    /// The file `name`, whose version in force hashed to `sha`, is no longer.
    pub(super) fn sub(&mut self, sha: &str, name: &str) {
        let line = line(sha, name);
        let mut borrow = false;
        for (limb, sub) in self.0.iter_mut().zip(line) {
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

/// The SHA-256 of the file's `sha256sum` line, as a number (big-endian, as its hex reads).
fn line(sha: &str, name: &str) -> [u64; 4] {
    let d = sha256::digest(format!("{sha}  {name}\n").as_bytes());
    let mut limbs = [0u64; 4];
    for (i, limb) in limbs.iter_mut().enumerate() {
        let at = 32 - 8 * (i + 1);
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[at..at + 8]);
        *limb = u64::from_be_bytes(b);
    }
    limbs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_is_its_lines_hash_and_a_sum_undoes() {
        let mut d = Digest::default();
        assert_eq!(d.hex(), "0".repeat(64));
        d.add("ab", "a.json");
        assert_eq!(d.hex(), sha256::hex(b"ab  a.json\n"));
        d.add("cd", "b.json");
        let mut other = Digest::default();
        other.add("cd", "b.json");
        other.add("ab", "a.json");
        assert_eq!(d, other, "in any order");
        d.sub("ab", "a.json");
        d.sub("cd", "b.json");
        assert_eq!(d, Digest::default());
    }

    #[test]
    fn carries_across_limbs() {
        let mut d = Digest([u64::MAX, u64::MAX, u64::MAX, 0]);
        let before = d;
        d.add("x", "y");
        d.sub("x", "y");
        assert_eq!(d, before);
    }
}
