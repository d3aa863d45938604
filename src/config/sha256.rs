//! SHA-256 (FIPS 180-4), to name a loaded config by the hash of its bytes.
//!
//! An operator compares this hash across a fleet (and with `sha256sum` of the file, or of the
//! value in etcd), so it must be the standard digest; it is written here in a few lines because
//! flyproxy takes no new crates. Speed matters at start with a config directory: every file is
//! hashed, and so is its line of the directory's digest (400,000 digests at 200,000 apps), so
//! where the CPU has the SHA extensions (`x86_64::compress_blocks`) the blocks go through
//! them, several times faster than the portable rounds. Not for anything secret: there is no
//! constant-time concern in naming a file.

/// The first 32 bits of the fractional parts of the cube roots of the first 64 primes.
const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// The first 32 bits of the fractional parts of the square roots of the first 8 primes.
const H0: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// The digest of `data`.
pub fn digest(data: &[u8]) -> [u8; 32] {
    let mut h = H0;
    let (whole, tail) = data.split_at(data.len() - data.len() % 64);
    compress_blocks(&mut h, whole);
    // Padding: a 1 bit, zeros, then the message length in bits as a big-endian u64, filling
    // one block, or two when fewer than 9 bytes are left after the message's tail.
    let mut last = [0u8; 128];
    last[..tail.len()].copy_from_slice(tail);
    last[tail.len()] = 0x80;
    let len = if tail.len() < 56 { 64 } else { 128 };
    let bits = (data.len() as u64).wrapping_mul(8);
    last[len - 8..len].copy_from_slice(&bits.to_be_bytes());
    compress_blocks(&mut h, &last[..len]);
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

/// The digest of `data` as 64 lower-case hex digits, as `sha256sum` prints it.
pub fn hex(data: &[u8]) -> String {
    use std::fmt::Write;
    digest(data)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            // Writing to a String cannot fail.
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// `blocks` (a multiple of 64 bytes) into the state: through the CPU's SHA extensions where
/// it has them, else the portable rounds.
fn compress_blocks(h: &mut [u32; 8], blocks: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if x86_64::available() {
        // SAFETY: the CPU has the features `compress_blocks` is compiled for (just checked).
        unsafe { x86_64::compress_blocks(h, blocks) };
        return;
    }
    for block in blocks.chunks_exact(64) {
        compress(h, block);
    }
}

/// One 64-byte block into the state.
fn compress(h: &mut [u32; 8], block: &[u8]) {
    let mut w = [0u32; 64];
    for (word, bytes) in w.iter_mut().zip(block.chunks_exact(4)) {
        *word = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    }
    for i in 16..64 {
        let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
        let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16]
            .wrapping_add(s0)
            .wrapping_add(w[i - 7])
            .wrapping_add(s1);
    }
    let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = *h;
    for i in 0..64 {
        let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
        let ch = (e & f) ^ (!e & g);
        let t1 = hh
            .wrapping_add(s1)
            .wrapping_add(ch)
            .wrapping_add(K[i])
            .wrapping_add(w[i]);
        let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
        let maj = (a & b) ^ (a & c) ^ (b & c);
        let t2 = s0.wrapping_add(maj);
        hh = g;
        g = f;
        f = e;
        e = d.wrapping_add(t1);
        d = c;
        c = b;
        b = a;
        a = t1.wrapping_add(t2);
    }
    for (state, v) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
        *state = state.wrapping_add(v);
    }
}

/// The rounds through the SHA extensions (SHA-NI: Intel since Goldmont and Ice Lake, AMD
/// since Zen), as Intel's white paper "Intel SHA Extensions" (2013) lays them out: the state
/// held as ABEF and CDGH, two rounds per `sha256rnds2`, the message schedule four words at a
/// time by `sha256msg1`/`sha256msg2`.
#[cfg(target_arch = "x86_64")]
mod x86_64 {
    use std::arch::x86_64::*;

    use super::K;

    /// Whether this CPU has what `compress_blocks` uses (checked once, then a load).
    pub(super) fn available() -> bool {
        is_x86_feature_detected!("sha")
            && is_x86_feature_detected!("sse2")
            && is_x86_feature_detected!("ssse3")
            && is_x86_feature_detected!("sse4.1")
    }

    /// Four rounds, `w` (the message words plus nothing) at round `4 * i`.
    #[inline(always)]
    unsafe fn rounds4(abef: &mut __m128i, cdgh: &mut __m128i, w: __m128i, i: usize) {
        // SAFETY: K has 64 words and i < 16: four words from 4 * i are in it.
        let k = _mm_loadu_si128(K.as_ptr().add(4 * i).cast());
        let wk = _mm_add_epi32(w, k);
        *cdgh = _mm_sha256rnds2_epu32(*cdgh, *abef, wk);
        *abef = _mm_sha256rnds2_epu32(*abef, *cdgh, _mm_shuffle_epi32(wk, 0x0E));
    }

    /// The next four message words from the last sixteen (`w0` oldest).
    #[inline(always)]
    unsafe fn schedule(w0: __m128i, w1: __m128i, w2: __m128i, w3: __m128i) -> __m128i {
        let t = _mm_add_epi32(_mm_sha256msg1_epu32(w0, w1), _mm_alignr_epi8(w3, w2, 4));
        _mm_sha256msg2_epu32(t, w3)
    }

    /// `blocks` (a multiple of 64 bytes) into the state.
    ///
    /// # Safety
    /// The CPU must have the SHA, SSE2, SSSE3 and SSE4.1 extensions (`available`).
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn compress_blocks(h: &mut [u32; 8], blocks: &[u8]) {
        // Each 32-bit word's bytes reversed: the message is big-endian.
        let swap = _mm_set_epi64x(0x0c0d_0e0f_0809_0a0b, 0x0405_0607_0001_0203);
        // SAFETY: `h` is 8 words, two unaligned 16-byte loads.
        let dcba = _mm_loadu_si128(h.as_ptr().cast());
        let hgfe = _mm_loadu_si128(h.as_ptr().add(4).cast());
        let cdab = _mm_shuffle_epi32(dcba, 0xB1);
        let efgh = _mm_shuffle_epi32(hgfe, 0x1B);
        let mut abef = _mm_alignr_epi8(cdab, efgh, 8);
        let mut cdgh = _mm_blend_epi16(efgh, cdab, 0xF0);
        for block in blocks.chunks_exact(64) {
            let (abef_was, cdgh_was) = (abef, cdgh);
            // SAFETY: the block is 64 bytes, four unaligned 16-byte loads.
            let load = |i: usize| {
                _mm_shuffle_epi8(_mm_loadu_si128(block.as_ptr().add(16 * i).cast()), swap)
            };
            let mut w = [load(0), load(1), load(2), load(3)];
            for i in 0..16 {
                if i >= 4 {
                    w[i % 4] = schedule(w[i % 4], w[(i + 1) % 4], w[(i + 2) % 4], w[(i + 3) % 4]);
                }
                rounds4(&mut abef, &mut cdgh, w[i % 4], i);
            }
            abef = _mm_add_epi32(abef, abef_was);
            cdgh = _mm_add_epi32(cdgh, cdgh_was);
        }
        let feba = _mm_shuffle_epi32(abef, 0x1B);
        let dchg = _mm_shuffle_epi32(cdgh, 0xB1);
        // SAFETY: `h` is 8 words, two unaligned 16-byte stores.
        _mm_storeu_si128(h.as_mut_ptr().cast(), _mm_blend_epi16(feba, dchg, 0xF0));
        _mm_storeu_si128(h.as_mut_ptr().add(4).cast(), _mm_alignr_epi8(dchg, feba, 8));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SHA extensions' rounds and the portable ones agree, over lengths across several
    /// blocks (where the CPU has the extensions; elsewhere there is one path only).
    #[test]
    fn extensions_agree_with_the_portable_rounds() {
        #[cfg(target_arch = "x86_64")]
        if x86_64::available() {
            let data: Vec<u8> = (0..64 * 9).map(|i: u32| (i * 131 + 7) as u8).collect();
            for blocks in 1..=9 {
                let mut fast = H0;
                let mut portable = H0;
                // SAFETY: `available` said the CPU has what it needs.
                unsafe { x86_64::compress_blocks(&mut fast, &data[..64 * blocks]) };
                for block in data[..64 * blocks].chunks_exact(64) {
                    compress(&mut portable, block);
                }
                assert_eq!(fast, portable, "{blocks} blocks");
            }
        }
    }

    #[test]
    fn known_vectors() {
        // FIPS 180-2 appendix B and the NIST example vectors.
        let cases: [(&[u8], &str); 4] = [
            (b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
            (b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
            (
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
                "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
            ),
            (
                b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu",
                "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                hex(input),
                want,
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            hex(&vec![b'a'; 1_000_000]),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
    }

    /// Every length around the padding boundaries (55, 56, 63, 64 bytes and beyond), with
    /// every byte value, against the system's `sha256sum` (coreutils, always present on Debian).
    #[test]
    fn matches_sha256sum() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in (0..=130).chain([191, 192, 255, 256, 300]) {
            let mut child = Command::new("sha256sum")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("sha256sum (coreutils) runs");
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(&data[..len])
                .expect("write to sha256sum");
            let out = child.wait_with_output().expect("sha256sum output");
            let printed = String::from_utf8(out.stdout).expect("hex output");
            assert_eq!(hex(&data[..len]), printed[..64], "length {len}");
        }
    }
}
