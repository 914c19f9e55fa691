//! Finding the Intel MP table and counting the processors it lists.

const FLOATING_SIGNATURE: &[u8; 4] = b"_MP_";
const TABLE_SIGNATURE: &[u8; 4] = b"PCMP";
const HEADER_LEN: usize = 44;
const ENTRY_PROCESSOR: u8 = 0;
const PROCESSOR_LEN: usize = 20;
const OTHER_LEN: usize = 8;
const CPU_ENABLED: u8 = 1;

fn sums_to_zero(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
}

/// Offset in `area` of a valid floating pointer structure, and the address
/// of the configuration table it points to.
pub fn find_floating(area: &[u8]) -> Option<(usize, u64)> {
    (0..area.len().saturating_sub(15))
        .step_by(16)
        .find_map(|off| {
            let s = &area[off..off + 16];
            (s[..4] == *FLOATING_SIGNATURE && sums_to_zero(s)).then(|| {
                let mut p = [0u8; 4];
                p.copy_from_slice(&s[4..8]);
                (off, u64::from(u32::from_le_bytes(p)))
            })
        })
}

/// Length of the configuration table that starts with `header` (at least
/// its first 6 bytes), if the signature is right.
pub fn table_len(header: &[u8]) -> Option<usize> {
    (header.len() >= 6 && header[..4] == *TABLE_SIGNATURE)
        .then(|| usize::from(u16::from_le_bytes([header[4], header[5]])))
}

/// Enabled processors listed by a whole configuration table. Entries are
/// walked within the table's length: an entry count that says more (some
/// monitors write one too many) or an entry cut off at the end stops the
/// walk, it does not void the table.
pub fn count_processors(table: &[u8]) -> Option<usize> {
    if table.len() < HEADER_LEN || table_len(table)? != table.len() || !sums_to_zero(table) {
        return None;
    }
    let count = u16::from_le_bytes([table[34], table[35]]);
    let mut at = HEADER_LEN;
    let mut cpus = 0;
    for _ in 0..count {
        let Some(&kind) = table.get(at) else { break };
        let len = if kind == ENTRY_PROCESSOR {
            PROCESSOR_LEN
        } else {
            OTHER_LEN
        };
        let Some(entry) = table.get(at..at + len) else {
            break;
        };
        if kind == ENTRY_PROCESSOR && entry[3] & CPU_ENABLED != 0 {
            cpus += 1;
        }
        at += len;
    }
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fix_checksum(bytes: &mut [u8], at: usize) {
        bytes[at] = 0;
        bytes[at] = 0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)));
    }

    #[test]
    fn finds_and_counts() {
        let mut area = [0u8; 64];
        area[32..36].copy_from_slice(b"_MP_");
        area[36..40].copy_from_slice(&0x9fc10u32.to_le_bytes());
        fix_checksum(&mut area[32..48], 10);
        assert_eq!(find_floating(&area), Some((32, 0x9fc10)));

        let mut table = [0u8; HEADER_LEN + 2 * PROCESSOR_LEN + OTHER_LEN];
        table[..4].copy_from_slice(b"PCMP");
        let len = table.len() as u16;
        table[4..6].copy_from_slice(&len.to_le_bytes());
        table[34] = 3;
        table[HEADER_LEN + 3] = CPU_ENABLED;
        table[HEADER_LEN + PROCESSOR_LEN + 3] = CPU_ENABLED;
        table[HEADER_LEN + 2 * PROCESSOR_LEN] = 1; // bus
        fix_checksum(&mut table, 7);
        assert_eq!(table_len(&table), Some(table.len()));
        assert_eq!(count_processors(&table), Some(2));
        // A count one too high, or far too high: the table's length rules.
        for count in [4, 0xffff] {
            table[34..36].copy_from_slice(&u16::to_le_bytes(count));
            fix_checksum(&mut table, 7);
            assert_eq!(count_processors(&table), Some(2), "count {count}");
        }
        table[20] ^= 1;
        assert_eq!(count_processors(&table), None, "bad checksum");
        assert_eq!(find_floating(&[0u8; 64]), None);
    }
}
