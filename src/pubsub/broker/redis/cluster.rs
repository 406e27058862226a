//! Redis Cluster routing for sharded pub/sub: the key slot of a channel (CRC16 of the
//! channel, or of its `{hash tag}`, modulo 16,384) and the map from slot to the master that
//! owns it, read with `CLUSTER SLOTS`.
//!
//! The map is read once per session (every time the client connects): a `MOVED` answer
//! to an SPUBLISH, a server-initiated SUNSUBSCRIBE (Redis 7 sends one to every subscriber
//! of a slot's channels when the slot leaves the node) or any other error ends the session,
//! and the next one reads the map again.

use redis::Value;

/// Slots in a Redis Cluster.
pub(super) const SLOTS: usize = 16_384;

/// CRC16/XMODEM, the checksum Redis Cluster hashes keys with.
const CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM);

/// The slot of `key`: the CRC16 of its hash tag (the bytes between the first `{` and the
/// next `}`, if not empty) or of the whole key, modulo 16,384 — as Redis computes it.
pub(super) fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    CRC16.checksum(tagged.unwrap_or(key)) % SLOTS as u16
}

/// Which master owns each slot, and where the masters are.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct SlotMap {
    /// `(host, port)` of each master, in the order `CLUSTER SLOTS` first names them.
    pub(super) masters: Vec<(String, u16)>,
    /// Slot -> index into `masters`.
    owners: Box<[u16]>,
}

impl SlotMap {
    /// The index of the master that owns `slot`.
    pub(super) fn owner(&self, slot: u16) -> usize {
        usize::from(self.owners[usize::from(slot)])
    }

    /// A hash tag whose slot `master` owns: the probe channel of that master carries it
    /// (`{tag}`), so a probe goes through every master.
    pub(super) fn tag_for(&self, master: usize) -> String {
        // Each master owns at least one slot (it is in the map because it does), and the
        // CRC of the decimal numbers reaches every slot within a few hundred thousand.
        (0u32..)
            .map(|k| k.to_string())
            .find(|tag| self.owner(slot(tag.as_bytes())) == master)
            .expect("every master owns a slot")
    }

    /// Parses a `CLUSTER SLOTS` reply: an array of `[start, end, [host, port, id, ..],
    /// replicas..]`. An empty host (the node does not know its address) becomes
    /// `seed_host`, the host the reply came from.
    ///
    /// # Errors
    /// A reply of another shape, or slots that no master owns (a cluster that is not
    /// fully covered cannot carry every topic).
    pub(super) fn parse(reply: &Value, seed_host: &str) -> Result<SlotMap, String> {
        let Value::Array(ranges) = reply else {
            return Err(format!("CLUSTER SLOTS: not an array: {reply:?}"));
        };
        let unset = u16::MAX;
        let mut owners = vec![unset; SLOTS].into_boxed_slice();
        let mut masters: Vec<(String, u16)> = Vec::new();
        for range in ranges {
            let bad = || format!("CLUSTER SLOTS: unexpected entry {range:?}");
            let Value::Array(fields) = range else {
                return Err(bad());
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return Err(bad());
            };
            let host = match master.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => return Err(bad()),
            };
            let host = if host.is_empty() || host == "?" {
                seed_host.to_owned()
            } else {
                host
            };
            let Some(Value::Int(port)) = master.get(1) else {
                return Err(bad());
            };
            let port = u16::try_from(*port).map_err(|_| bad())?;
            let (start, end) = (usize::try_from(*start), usize::try_from(*end));
            let (Ok(start), Ok(end)) = (start, end) else {
                return Err(bad());
            };
            if start > end || end >= SLOTS {
                return Err(bad());
            }
            let index = match masters.iter().position(|m| m.0 == host && m.1 == port) {
                Some(i) => i,
                None => {
                    masters.push((host, port));
                    masters.len() - 1
                }
            };
            owners[start..=end].fill(index as u16);
        }
        if let Some(missing) = owners.iter().position(|&o| o == unset) {
            let count = owners.iter().filter(|&&o| o == unset).count();
            return Err(format!(
                "the cluster does not cover every slot ({count} unowned, the first {missing})"
            ));
        }
        Ok(SlotMap { masters, owners })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_ones_redis_computes() {
        // The Redis Cluster specification's test vector, and slots `CLUSTER KEYSLOT` gives.
        assert_eq!(CRC16.checksum(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"wsring:news"), slot(b"wsring:news"));
        // A hash tag: only what is between the first { and the next } counts.
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"a{foo}b{bar}"), slot(b"foo"));
        // An empty tag, or no closing brace: the whole key.
        assert_eq!(slot(b"{}foo"), CRC16.checksum(b"{}foo") % 16_384);
        assert_eq!(slot(b"{foo"), CRC16.checksum(b"{foo") % 16_384);
    }

    fn range(start: i64, end: i64, host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::Int(start),
            Value::Int(end),
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ]),
        ])
    }

    #[test]
    fn a_full_map_parses_and_every_master_gets_a_probe_tag() {
        let reply = Value::Array(vec![
            range(0, 5460, "127.0.0.1", 7000),
            range(10923, 16383, "", 7002),
            range(5461, 10922, "127.0.0.1", 7001),
        ]);
        let map = SlotMap::parse(&reply, "10.0.0.9").expect("parse");
        assert_eq!(
            map.masters,
            vec![
                ("127.0.0.1".to_owned(), 7000),
                ("10.0.0.9".to_owned(), 7002),
                ("127.0.0.1".to_owned(), 7001)
            ]
        );
        assert_eq!(map.owner(0), 0);
        assert_eq!(map.owner(5461), 2);
        assert_eq!(map.owner(16383), 1);
        for m in 0..3 {
            let tag = map.tag_for(m);
            assert_eq!(map.owner(slot(format!("x{{{tag}}}").as_bytes())), m);
        }
    }

    #[test]
    fn a_partial_or_odd_map_is_refused() {
        let partial = Value::Array(vec![range(0, 100, "127.0.0.1", 7000)]);
        let e = SlotMap::parse(&partial, "h").unwrap_err();
        assert!(e.contains("16283 unowned"), "{e}");
        for odd in [
            Value::Int(1),
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![range(5, 1, "h", 1)]),
            Value::Array(vec![range(0, 16384, "h", 1)]),
            Value::Array(vec![range(0, 16383, "h", 70_000)]),
        ] {
            assert!(SlotMap::parse(&odd, "h").is_err(), "{odd:?}");
        }
    }
}
