//! RSA signature verification (RS256/384/512: RSASSA-PKCS1-v1_5; PS256/384/512:
//! RSASSA-PSS with MGF1 and a salt as long as the hash, RFC 7518 §3.3, §3.5).
//!
//! The public operation `s^e mod n` is Montgomery arithmetic on 32-bit
//! limbs written for wasm32, where a 32×32→64-bit multiply is one
//! instruction and 64×64→128 is a library call: general-purpose bignum
//! crates run it several times slower there (their constant-time
//! exponentiation walks the exponent at the modulus' width; a public
//! exponent needs 17 multiplications). Verification handles only public
//! data, so nothing here needs to be constant time.

use sha2::{Digest, Sha256, Sha384, Sha512};

/// Smallest modulus accepted, in bits.
pub const MIN_BITS: usize = 2048;
/// Largest modulus accepted, in bits (bounds the work per verification).
pub const MAX_BITS: usize = 8192;

/// Why an RSA public key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RsaKeyError {
    #[error("modulus is {0} bits, fewer than {MIN_BITS}")]
    TooSmall(usize),
    #[error("modulus is {0} bits, more than {MAX_BITS}")]
    TooLarge(usize),
    #[error("modulus is even")]
    EvenModulus,
    #[error("exponent must be odd, at least 3 and at most 64 bits")]
    BadExponent,
}

/// A public key with its Montgomery constants, computed once per key.
#[derive(Clone)]
pub struct RsaPublicKey {
    /// Little-endian limbs of n.
    n: Vec<u32>,
    /// Bytes in the modulus (signatures have exactly this length).
    size: usize,
    e: u64,
    /// -n⁻¹ mod 2³².
    n0inv: u32,
    /// R² mod n, R = 2^(32·limbs).
    rr: Vec<u32>,
}

impl std::fmt::Debug for RsaPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RsaPublicKey({} bits, e={})", self.bits(), self.e)
    }
}

fn limbs_from_be(bytes: &[u8], limbs: usize) -> Vec<u32> {
    let mut out = vec![0u32; limbs];
    for (i, b) in bytes.iter().rev().enumerate() {
        if let Some(l) = out.get_mut(i / 4) {
            *l |= u32::from(*b) << (8 * (i % 4));
        }
    }
    out
}

/// a ≥ b, same length.
fn geq(a: &[u32], b: &[u32]) -> bool {
    for (x, y) in a.iter().rev().zip(b.iter().rev()) {
        if x != y {
            return x > y;
        }
    }
    true
}

/// a -= b (mod 2^(32·len)), same length.
fn sub_assign(a: &mut [u32], b: &[u32]) {
    let mut borrow = 0u64;
    for (x, y) in a.iter_mut().zip(b) {
        let d = u64::from(*x)
            .wrapping_sub(u64::from(*y))
            .wrapping_sub(borrow);
        *x = d as u32;
        borrow = (d >> 63) & 1;
    }
}

impl RsaPublicKey {
    /// A key from the big-endian modulus and exponent (JWK `n`, `e`).
    pub fn new(n_be: &[u8], e_be: &[u8]) -> Result<RsaPublicKey, RsaKeyError> {
        let n_be = strip_zeros(n_be);
        let bits = n_be.first().map_or(0, |top| {
            (n_be.len() - 1) * 8 + (8 - top.leading_zeros() as usize)
        });
        if bits < MIN_BITS {
            return Err(RsaKeyError::TooSmall(bits));
        }
        if bits > MAX_BITS {
            return Err(RsaKeyError::TooLarge(bits));
        }
        if n_be.last().is_none_or(|b| b & 1 == 0) {
            return Err(RsaKeyError::EvenModulus);
        }
        let e_be = strip_zeros(e_be);
        if e_be.len() > 8 {
            return Err(RsaKeyError::BadExponent);
        }
        let e = e_be.iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b));
        if e < 3 || e & 1 == 0 {
            return Err(RsaKeyError::BadExponent);
        }
        let limbs = n_be.len().div_ceil(4);
        let n = limbs_from_be(n_be, limbs);
        let n0 = n.first().copied().unwrap_or(1);
        // Newton's iteration doubles the correct low bits: 1 → 32 in 5 steps.
        let mut inv: u32 = 1;
        for _ in 0..5 {
            inv = inv.wrapping_mul(2u32.wrapping_sub(n0.wrapping_mul(inv)));
        }
        let mut key = RsaPublicKey {
            n,
            size: n_be.len(),
            e,
            n0inv: inv.wrapping_neg(),
            rr: Vec::new(),
        };
        key.rr = key.r_squared(bits);
        Ok(key)
    }

    /// R² mod n, cheaply: 2^(bits−1) < n doubled modulo n up to R·2^limbs
    /// (the Montgomery form of 2^limbs), then squared five times in the
    /// Montgomery domain: R·2^(32·limbs) = R·R.
    fn r_squared(&self, bits: usize) -> Vec<u32> {
        let s = self.n.len();
        let mut x = vec![0u32; s];
        if let Some(l) = x.get_mut((bits - 1) / 32) {
            *l = 1 << ((bits - 1) % 32);
        }
        for _ in 0..(32 * s + s + 1).saturating_sub(bits) {
            let mut carry = 0u32;
            for l in x.iter_mut() {
                let v = u64::from(*l) << 1 | u64::from(carry);
                *l = v as u32;
                carry = (v >> 32) as u32;
            }
            if carry != 0 || geq(&x, &self.n) {
                sub_assign(&mut x, &self.n);
            }
        }
        let mut t = vec![0u32; 2 * s + 1];
        let mut y = vec![0u32; s];
        for _ in 0..5 {
            self.mont_sqr(&x, &mut t, &mut y);
            std::mem::swap(&mut x, &mut y);
        }
        x
    }

    /// Modulus size in bits.
    pub fn bits(&self) -> usize {
        let top = self.n.last().copied().unwrap_or(0);
        self.n.len() * 32 - top.leading_zeros() as usize
    }

    /// out = a·b·R⁻¹ mod n (CIOS); `t` is scratch of limbs + 2.
    // Indexing is safe: every slice is checked to its length on entry (a
    // mismatch returns without touching `out`), and indices stay below it.
    #[allow(clippy::indexing_slicing)]
    fn mont_mul(&self, a: &[u32], b: &[u32], t: &mut [u32], out: &mut [u32]) {
        let s = self.n.len();
        let n = &self.n[..];
        if s == 0 || a.len() != s || b.len() != s || out.len() != s || t.len() < s + 2 {
            return;
        }
        let t = &mut t[..s + 2];
        t.fill(0);
        for &bi in b {
            let bi = u64::from(bi);
            // t += a·bi
            let mut c = 0u64;
            for (tj, &aj) in t.iter_mut().zip(a) {
                let v = u64::from(*tj) + u64::from(aj) * bi + c;
                *tj = v as u32;
                c = v >> 32;
            }
            let v = u64::from(t[s]) + c;
            t[s] = v as u32;
            t[s + 1] = (v >> 32) as u32;
            // t = (t + m·n) / 2³²
            let m = u64::from(t[0].wrapping_mul(self.n0inv));
            let mut c = (u64::from(t[0]) + m * u64::from(n[0])) >> 32;
            for j in 1..s {
                let v = u64::from(t[j]) + m * u64::from(n[j]) + c;
                t[j - 1] = v as u32;
                c = v >> 32;
            }
            let v = u64::from(t[s]) + c;
            t[s - 1] = v as u32;
            t[s] = t[s + 1] + (v >> 32) as u32;
        }
        out.copy_from_slice(&t[..s]);
        if t[s] != 0 || geq(out, n) {
            sub_assign(out, n);
        }
    }

    /// out = a²·R⁻¹ mod n: the square first (each cross product once,
    /// doubled), then a separate Montgomery reduction; about 3/4 of the
    /// work of [`Self::mont_mul`]. `t` is scratch of 2·limbs + 1.
    // Indexing is safe: lengths are checked on entry; i + j < 2s, i + s ≤ 2s.
    #[allow(clippy::indexing_slicing)]
    fn mont_sqr(&self, a: &[u32], t: &mut [u32], out: &mut [u32]) {
        let s = self.n.len();
        let n = &self.n[..];
        if s == 0 || a.len() != s || out.len() != s || t.len() < 2 * s + 1 {
            return;
        }
        let t = &mut t[..2 * s + 1];
        t.fill(0);
        // Cross products a[i]·a[j], i < j.
        for i in 0..s {
            let ai = u64::from(a[i]);
            let mut c = 0u64;
            for j in i + 1..s {
                let v = u64::from(t[i + j]) + ai * u64::from(a[j]) + c;
                t[i + j] = v as u32;
                c = v >> 32;
            }
            t[i + s] = c as u32;
        }
        // Double them, and add the squares a[i]² on the diagonal.
        let mut carry = 0u64;
        for i in 0..s {
            let sq = u64::from(a[i]) * u64::from(a[i]);
            let lo = (u64::from(t[2 * i]) << 1) + (sq & 0xffff_ffff) + carry;
            t[2 * i] = lo as u32;
            let hi = (u64::from(t[2 * i + 1]) << 1) + (sq >> 32) + (lo >> 32);
            t[2 * i + 1] = hi as u32;
            carry = hi >> 32;
        }
        t[2 * s] = carry as u32;
        // Montgomery reduction: clear the low s limbs one at a time.
        for i in 0..s {
            let m = u64::from(t[i].wrapping_mul(self.n0inv));
            let mut c = 0u64;
            for j in 0..s {
                let v = u64::from(t[i + j]) + m * u64::from(n[j]) + c;
                t[i + j] = v as u32;
                c = v >> 32;
            }
            let mut k = i + s;
            while c != 0 && k <= 2 * s {
                let v = u64::from(t[k]) + c;
                t[k] = v as u32;
                c = v >> 32;
                k += 1;
            }
        }
        out.copy_from_slice(&t[s..2 * s]);
        if t[2 * s] != 0 || geq(out, n) {
            sub_assign(out, n);
        }
    }

    /// sᵉ mod n as big-endian bytes of the modulus' length; `None` if the
    /// signature has the wrong length or is not below n.
    pub fn public_op(&self, sig: &[u8]) -> Option<Vec<u8>> {
        if sig.len() != self.size {
            return None;
        }
        let s = self.n.len();
        let x = limbs_from_be(sig, s);
        if geq(&x, &self.n) {
            return None;
        }
        let mut t = vec![0u32; 2 * s + 1];
        let mut xm = vec![0u32; s];
        self.mont_mul(&x, &self.rr, &mut t, &mut xm);
        let mut acc = xm.clone();
        let mut tmp = vec![0u32; s];
        let bits = 64 - self.e.leading_zeros();
        for k in (0..bits.saturating_sub(1)).rev() {
            self.mont_sqr(&acc, &mut t, &mut tmp);
            std::mem::swap(&mut acc, &mut tmp);
            if self.e >> k & 1 == 1 {
                self.mont_mul(&acc, &xm, &mut t, &mut tmp);
                std::mem::swap(&mut acc, &mut tmp);
            }
        }
        let mut one = vec![0u32; s];
        if let Some(l) = one.first_mut() {
            *l = 1;
        }
        self.mont_mul(&acc, &one, &mut t, &mut tmp);
        let mut out = vec![0u8; self.size];
        for (i, o) in out.iter_mut().rev().enumerate() {
            *o = tmp.get(i / 4).map_or(0, |l| (l >> (8 * (i % 4))) as u8);
        }
        Some(out)
    }
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    b.get(first..).unwrap_or(&[])
}

/// The hash of an RS/PS algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha256 => Sha256::digest(data).to_vec(),
            Hash::Sha384 => Sha384::digest(data).to_vec(),
            Hash::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    fn len(self) -> usize {
        match self {
            Hash::Sha256 => 32,
            Hash::Sha384 => 48,
            Hash::Sha512 => 64,
        }
    }

    /// DER of the DigestInfo prefix (RFC 8017 §9.2, note 1).
    fn digest_info_prefix(self) -> &'static [u8] {
        match self {
            Hash::Sha256 => &[
                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x01, 0x05, 0x00, 0x04, 0x20,
            ],
            Hash::Sha384 => &[
                0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x02, 0x05, 0x00, 0x04, 0x30,
            ],
            Hash::Sha512 => &[
                0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x03, 0x05, 0x00, 0x04, 0x40,
            ],
        }
    }
}

/// RSASSA-PKCS1-v1_5 verification: the whole encoded message is rebuilt
/// and compared (no parsing of the padding, so no BERserk-style leniency).
pub fn verify_pkcs1v15(key: &RsaPublicKey, hash: Hash, msg: &[u8], sig: &[u8]) -> bool {
    let Some(em) = key.public_op(sig) else {
        return false;
    };
    let prefix = hash.digest_info_prefix();
    let t_len = prefix.len() + hash.len();
    if em.len() < t_len + 11 {
        return false;
    }
    let mut expected = Vec::with_capacity(em.len());
    expected.extend_from_slice(&[0x00, 0x01]);
    expected.resize(em.len() - t_len - 1, 0xff);
    expected.push(0x00);
    expected.extend_from_slice(prefix);
    expected.extend_from_slice(&hash.digest(msg));
    em == expected
}

fn mgf1(hash: Hash, seed: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + hash.len());
    let mut counter = 0u32;
    while out.len() < len {
        let mut block = Vec::with_capacity(seed.len() + 4);
        block.extend_from_slice(seed);
        block.extend_from_slice(&counter.to_be_bytes());
        out.extend_from_slice(&hash.digest(&block));
        counter += 1;
    }
    out.truncate(len);
    out
}

/// RSASSA-PSS verification (RFC 8017 §9.1.2), MGF1 with the same hash,
/// salt length equal to the hash length (RFC 7518 §3.5).
pub fn verify_pss(key: &RsaPublicKey, hash: Hash, msg: &[u8], sig: &[u8]) -> bool {
    let Some(em_full) = key.public_op(sig) else {
        return false;
    };
    let em_bits = key.bits() - 1;
    let em_len = em_bits.div_ceil(8);
    // EM is the low em_len bytes; any byte above must be zero.
    let Some(split) = em_full.len().checked_sub(em_len) else {
        return false;
    };
    let (above, em) = em_full.split_at(split);
    if above.iter().any(|&b| b != 0) {
        return false;
    }
    let h_len = hash.len();
    let s_len = h_len;
    if em_len < h_len + s_len + 2 || em.last() != Some(&0xbc) {
        return false;
    }
    let db_len = em_len - h_len - 1;
    let (masked_db, rest) = em.split_at(db_len);
    let Some(h) = rest.get(..h_len) else {
        return false;
    };
    let unused_bits = 8 * em_len - em_bits;
    let top_mask = 0xffu8.checked_shr(unused_bits as u32).unwrap_or(0);
    if masked_db.first().is_none_or(|b| b & !top_mask != 0) {
        return false;
    }
    let mut db: Vec<u8> = masked_db
        .iter()
        .zip(mgf1(hash, h, db_len))
        .map(|(a, b)| a ^ b)
        .collect();
    if let Some(b) = db.first_mut() {
        *b &= top_mask;
    }
    // DB = PS (zeros) || 0x01 || salt
    let ps_len = db_len - s_len - 1;
    let (ps, tail) = db.split_at(ps_len);
    if ps.iter().any(|&b| b != 0) || tail.first() != Some(&0x01) {
        return false;
    }
    let salt = tail.get(1..).unwrap_or(&[]);
    let m_hash = hash.digest(msg);
    let mut m_prime = Vec::with_capacity(8 + h_len + s_len);
    m_prime.extend_from_slice(&[0u8; 8]);
    m_prime.extend_from_slice(&m_hash);
    m_prime.extend_from_slice(salt);
    hash.digest(&m_prime) == h
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    // A 2048-bit key and an RS256 signature made with another implementation
    // (the `rsa` crate), so the Montgomery code is checked on wasm32 too.
    const N: &str = "e82898dd930171ff85bba1480e901107dc72d8cb4483c9f15a9442b0f2aad0805c44c9b2e57034674997bf504faacfe9f589499541ce770dfb95a4c1c93c8b6f4c70bc54c70d29902c96f1d8864df069867cb62258f8541a44360448280aa5141458bf7f478c2c88c612d83d82350bf5ceacab21cc2d18c43c7658699ce661ee1975f9c22af9bcbf3852e482d7754008c5b4f64abc2e268dce16e8c75f55a2209ef409d82563697f0bfa2f886d4366bfd07328e8b98afa072bfddfc98cbc7b7dae4c0964157c8822e86805c2a7b1efdd3c1ce1d9b13f14c49f0c80c9b124b7c17bd6bc0a0914004f13c431c3e504e313b46a5ce9f21e9a0de331fa28104a6037";
    const SIG: &str = "cc5e14ac02391948b0fae813f2af0dc4c0579b3a0f851af399cf505a5198263a67dce80caf8421d5d9245de815043e5e4241f0f7af6d3a479a527dbae48d2bec0d4c8605e82ca54031ca3a6e30b436606d1b757bd699b8eded674a823a5eb4af87ffff30e6b3913883dca57a37ff755d3bc8969d7ab3d7329ff3304b1b2c0945c55e6df215064c7a311115aecca21adc0d01889a9f9e6704cb49e9b1e37189bad4ef9164e519dc68ed7459f21d46db50c97eac95f557cb2aef06107d03b10d95d760c9fce35f01d68117a922350b3aefc3809852079131828a39ee6d368dc9b9235658e4bcd678a22f1a3da79b8ca46c180a49cb5c405eda37129c6884bc35ca";
    const MSG: &[u8] = b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn pkcs1v15_vector_verifies_and_tampering_fails() {
        let key = RsaPublicKey::new(&hex(N), &[1, 0, 1]).unwrap();
        assert_eq!(key.bits(), 2048);
        let sig = hex(SIG);
        assert!(verify_pkcs1v15(&key, Hash::Sha256, MSG, &sig));
        assert!(!verify_pkcs1v15(&key, Hash::Sha384, MSG, &sig));
        assert!(!verify_pkcs1v15(&key, Hash::Sha256, b"other", &sig));
        let mut bad = sig.clone();
        bad[100] ^= 1;
        assert!(!verify_pkcs1v15(&key, Hash::Sha256, MSG, &bad));
        assert!(!verify_pkcs1v15(&key, Hash::Sha256, MSG, &sig[1..]));
        assert!(!verify_pss(&key, Hash::Sha256, MSG, &sig));
    }

    #[test]
    fn public_op_round_trips_small_values() {
        // 2^e mod n for a tiny base is just 2^65537 reduced; check x^e for
        // x = 1 (always 1) and x = 0 (always 0).
        let key = RsaPublicKey::new(&hex(N), &[1, 0, 1]).unwrap();
        let mut one = vec![0u8; 256];
        one[255] = 1;
        assert_eq!(key.public_op(&one).unwrap(), one);
        let zero = vec![0u8; 256];
        assert_eq!(key.public_op(&zero).unwrap(), zero);
    }

    #[test]
    fn squaring_agrees_with_multiplication() {
        let key = RsaPublicKey::new(&hex(N), &[1, 0, 1]).unwrap();
        let s = key.n.len();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut t = vec![0u32; 2 * s + 1];
        for round in 0..50 {
            let mut x: Vec<u32> = (0..s)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u32
                })
                .collect();
            // Below n: clear the top limb's high bits; also try extremes.
            x[s - 1] &= key.n[s - 1] >> 1;
            if round == 0 {
                x = key.n.clone();
                x[0] -= 1; // n - 1
            }
            let (mut a, mut b) = (vec![0u32; s], vec![0u32; s]);
            key.mont_mul(&x, &x, &mut t, &mut a);
            key.mont_sqr(&x, &mut t, &mut b);
            assert_eq!(a, b, "round {round}");
        }
    }

    #[test]
    fn weak_keys_are_refused() {
        let n = hex(N);
        // The low half of the modulus: about 1024 bits.
        assert!(matches!(
            RsaPublicKey::new(&n[128..], &[1, 0, 1]),
            Err(RsaKeyError::TooSmall(b)) if (1017..=1024).contains(&b)
        ));
        assert_eq!(
            RsaPublicKey::new(&n, &[1]).unwrap_err(),
            RsaKeyError::BadExponent
        );
        assert_eq!(
            RsaPublicKey::new(&n, &[1, 0, 0]).unwrap_err(),
            RsaKeyError::BadExponent
        );
        let mut even = n.clone();
        even[255] &= 0xfe;
        assert_eq!(
            RsaPublicKey::new(&even, &[1, 0, 1]).unwrap_err(),
            RsaKeyError::EvenModulus
        );
        assert!(matches!(
            RsaPublicKey::new(&vec![0xff; 1025], &[1, 0, 1]),
            Err(RsaKeyError::TooLarge(8200))
        ));
    }
}
