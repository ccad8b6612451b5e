//! Key encoding for sled trees. Integer parts are big-endian so byte order is numeric order;
//! string parts are ids whose charset excludes 0x00, which separates them.

/// Separator between key parts.
pub const SEP: u8 = 0;

/// `a \0 b`.
pub fn pair(a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + 1 + b.len());
    k.extend_from_slice(a.as_bytes());
    k.push(SEP);
    k.extend_from_slice(b.as_bytes());
    k
}

/// `a \0 n` with n big-endian.
pub fn num(a: &str, n: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + 9);
    k.extend_from_slice(a.as_bytes());
    k.push(SEP);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// `a \0`: the prefix of every key of `a`.
pub fn prefix(a: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + 1);
    k.extend_from_slice(a.as_bytes());
    k.push(SEP);
    k
}

/// The number at the end of a key made by [`num`].
pub fn num_suffix(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// The string after the first separator of a key made by [`pair`].
pub fn pair_suffix(key: &[u8]) -> Option<&str> {
    let i = key.iter().position(|&b| b == SEP)?;
    std::str::from_utf8(&key[i + 1..]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_order_is_byte_order() {
        let ks: Vec<Vec<u8>> = [0u64, 1, 2, 255, 256, 65_536, u64::MAX].iter().map(|&n| num("bob", n)).collect();
        let mut sorted = ks.clone();
        sorted.sort();
        assert_eq!(ks, sorted);
        assert_eq!(num_suffix(&num("bob", 258)), Some(258));
    }

    #[test]
    fn prefixes_do_not_collide() {
        // "bo" must not see "bob"'s keys.
        assert!(!num("bob", 1).starts_with(&prefix("bo")));
        assert!(num("bob", 1).starts_with(&prefix("bob")));
        assert_eq!(pair_suffix(&pair("bob", "dm:a:b")), Some("dm:a:b"));
    }
}
