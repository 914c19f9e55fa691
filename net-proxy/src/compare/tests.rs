use super::*;
use crate::testing::build;
use etherparse::{ArpHardwareId, ArpOperation, ArpPacket, EtherType, PacketBuilder};

const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const GUEST: [u8; 4] = [10, 0, 0, 1];
const CLIENT: [u8; 4] = [10, 0, 0, 2];
const GUEST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const CLIENT6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
/// The client's sequence number both guests acknowledge by default.
const ACK: u32 = 5000;
const EPOCH: u64 = 7;

/// A TCP segment from the guest (port `port`) to the client (40000).
#[derive(Debug, Clone, Copy)]
struct Seg {
    port: u16,
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    fin: bool,
    rst: bool,
    window: u16,
    ttl: u8,
    vlan: Option<u16>,
    ipv6: bool,
}

fn seg(seq: u32) -> Seg {
    Seg {
        port: 80,
        seq,
        ack: Some(ACK),
        syn: false,
        fin: false,
        rst: false,
        window: 1000,
        ttl: 64,
        vlan: None,
        ipv6: false,
    }
}

impl Seg {
    fn ack(self, ack: u32) -> Self {
        Seg {
            ack: Some(ack),
            ..self
        }
    }
    fn no_ack(self) -> Self {
        Seg { ack: None, ..self }
    }
    fn syn(self) -> Self {
        Seg { syn: true, ..self }
    }
    fn fin(self) -> Self {
        Seg { fin: true, ..self }
    }
    fn rst(self) -> Self {
        Seg { rst: true, ..self }
    }
    fn port(self, port: u16) -> Self {
        Seg { port, ..self }
    }
    /// What the SVM sends for the same segment: window and TTL differ,
    /// which is not compared.
    fn svm(self) -> Self {
        Seg {
            window: 2000,
            ttl: 63,
            ..self
        }
    }

    fn frame(&self, payload: &[u8]) -> Vec<u8> {
        macro_rules! tcp {
            ($ip:expr) => {{
                let mut step = $ip.tcp(self.port, 40000, self.seq, self.window);
                if self.syn {
                    step = step.syn();
                }
                if self.fin {
                    step = step.fin();
                }
                if self.rst {
                    step = step.rst();
                }
                if let Some(ack) = self.ack {
                    step = step.ack(ack);
                }
                build!(step, payload)
            }};
        }
        let eth = PacketBuilder::ethernet2(GUEST_MAC, CLIENT_MAC);
        match (self.vlan, self.ipv6) {
            (None, false) => tcp!(eth.ipv4(GUEST, CLIENT, self.ttl)),
            (None, true) => tcp!(eth.ipv6(GUEST6, CLIENT6, self.ttl)),
            (Some(id), false) => tcp!(eth.single_vlan(vlan(id)).ipv4(GUEST, CLIENT, self.ttl)),
            (Some(id), true) => tcp!(eth.single_vlan(vlan(id)).ipv6(GUEST6, CLIENT6, self.ttl)),
        }
    }
}

fn vlan(id: u16) -> etherparse::VlanId {
    etherparse::VlanId::try_new(id).expect("vlan id")
}

fn udp(port: u16, ttl: u8, payload: &[u8]) -> Vec<u8> {
    build!(
        PacketBuilder::ethernet2(GUEST_MAC, CLIENT_MAC)
            .ipv4(GUEST, CLIENT, ttl)
            .udp(port, 53),
        payload
    )
}

fn arp(target: [u8; 4]) -> Vec<u8> {
    let packet = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &GUEST_MAC,
        &GUEST,
        &[0; 6],
        &target,
    )
    .expect("arp packet");
    let step = PacketBuilder::ethernet2(GUEST_MAC, [0xff; 6]).arp(packet);
    let mut frame = Vec::with_capacity(step.size());
    step.write(&mut frame).expect("build frame");
    frame
}

fn compare() -> Compare {
    Compare::new(CompareConfig::default(), EPOCH)
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// An outcome that releases `frames` and asks for nothing.
fn released(frames: &[&Vec<u8>]) -> Outcome {
    Outcome {
        release: frames.iter().map(|f| (*f).clone()).collect(),
        checkpoint: None,
    }
}

fn nothing() -> Outcome {
    Outcome::default()
}

#[test]
fn identical_streams_release_each_frame_when_its_twin_arrives() {
    let now = Instant::now();
    let mut c = compare();
    let p1 = seg(1000).frame(b"hello ");
    let p2 = seg(1006).frame(b"world");
    assert_eq!(c.primary(p1.clone(), now), nothing());
    assert_eq!(c.primary(p2.clone(), now), nothing());
    assert_eq!(c.stats().held_frames, 2);
    let s1 = seg(1000).svm().frame(b"hello ");
    assert_eq!(c.secondary(EPOCH, &s1, now), released(&[&p1]));
    let s2 = seg(1006).svm().frame(b"world");
    assert_eq!(c.secondary(EPOCH, &s2, now), released(&[&p2]));
    // The SVM ahead: the PVM's twin goes out at once.
    let s3 = seg(1011).svm().frame(b"!");
    assert_eq!(c.secondary(EPOCH, &s3, now), nothing());
    assert_eq!(c.stats().queue_depth, 1);
    let p3 = seg(1011).frame(b"!");
    assert_eq!(c.primary(p3.clone(), now), released(&[&p3]));
    let stats = c.stats();
    assert_eq!((stats.compared, stats.matched), (3, 3));
    assert_eq!((stats.held_frames, stats.held_bytes), (0, 0));
    assert_eq!((stats.queue_depth, stats.queue_bytes), (0, 0));
    assert_eq!(stats.connections, 1);
    assert_eq!(c.next_deadline(), None, "nothing waits");
}

#[test]
fn different_segmentation_matches() {
    let now = Instant::now();
    let data = payload(3000, 1);
    // PVM one segment, SVM three.
    let mut c = compare();
    let big = seg(1).frame(&data);
    assert_eq!(c.primary(big.clone(), now), nothing());
    for (i, part) in data.chunks(1000).enumerate() {
        let s = seg(1 + 1000 * i as u32).svm().frame(part);
        let expected = if i == 2 { released(&[&big]) } else { nothing() };
        assert_eq!(c.secondary(EPOCH, &s, now), expected, "svm part {i}");
    }
    // PVM three segments, SVM one: all three at once, in order.
    let mut c = compare();
    let parts: Vec<Vec<u8>> = data
        .chunks(1000)
        .enumerate()
        .map(|(i, part)| seg(1 + 1000 * i as u32).frame(part))
        .collect();
    for p in &parts {
        assert_eq!(c.primary(p.clone(), now), nothing());
    }
    let out = c.secondary(EPOCH, &seg(1).svm().frame(&data), now);
    assert_eq!(out, released(&[&parts[0], &parts[1], &parts[2]]));
    // Overlapping segmentations: 0..1500 and 1500..3000 vs 0..1000,
    // 1000..3000.
    let mut c = compare();
    let a = seg(1).frame(&data[..1500]);
    let b = seg(1501).frame(&data[1500..]);
    assert_eq!(c.primary(a.clone(), now), nothing());
    assert_eq!(c.primary(b.clone(), now), nothing());
    let out = c.secondary(EPOCH, &seg(1).svm().frame(&data[..1000]), now);
    assert_eq!(out, nothing());
    let out = c.secondary(EPOCH, &seg(1001).svm().frame(&data[1000..]), now);
    assert_eq!(out, released(&[&a, &b]));
    assert_eq!(c.stats().queue_depth, 0);
}

#[test]
fn retransmissions_on_either_side() {
    let now = Instant::now();
    let mut c = compare();
    let p = seg(100).frame(b"abcdef");
    assert_eq!(c.primary(p.clone(), now), nothing());
    // The SVM sends it twice: the first releases, the second is dropped.
    let s = seg(100).svm().frame(b"abcdef");
    assert_eq!(c.secondary(EPOCH, &s, now), released(&[&p]));
    assert_eq!(c.secondary(EPOCH, &s, now), nothing());
    assert_eq!(
        c.stats().queue_depth,
        0,
        "a matched retransmission waits for nothing"
    );
    // The PVM retransmits matched bytes: out at once.
    let again = seg(100).frame(b"abcdef");
    assert_eq!(c.primary(again.clone(), now), released(&[&again]));
    let part = seg(102).frame(b"cd");
    assert_eq!(c.primary(part.clone(), now), released(&[&part]));
    // A PVM retransmission of bytes not matched yet waits like the
    // original, and both go with the SVM's bytes.
    let next = seg(106).frame(b"ghij");
    let next_again = seg(106).frame(b"ghij");
    assert_eq!(c.primary(next.clone(), now), nothing());
    assert_eq!(c.primary(next_again.clone(), now), nothing());
    // An SVM segment overlapping matched and new bytes.
    let s = seg(104).svm().frame(b"efghij");
    assert_eq!(c.secondary(EPOCH, &s, now), released(&[&next, &next_again]));
    assert_eq!(c.stats().checkpoints(Cause::Mismatch), 0);
}

#[test]
fn a_one_byte_difference_is_a_mismatch_and_holds_the_connection() {
    let now = Instant::now();
    let mut c = compare();
    let good = seg(1).frame(b"same ");
    let bad = seg(6).frame(b"answer 42");
    assert_eq!(c.primary(good.clone(), now), nothing());
    assert_eq!(c.primary(bad.clone(), now), nothing());
    let s = seg(1).svm().frame(b"same answer 43");
    let out = c.secondary(EPOCH, &s, now);
    assert_eq!(
        out.release,
        vec![good],
        "bytes before the difference matched"
    );
    assert_eq!(out.checkpoint, Some(Cause::Mismatch));
    // Asked once: later frames are held, no new cause.
    let later = seg(15).frame(b"more");
    assert_eq!(c.primary(later.clone(), now), nothing());
    assert_eq!(
        c.secondary(EPOCH, &seg(15).svm().frame(b"more"), now),
        nothing()
    );
    assert_eq!(c.poll(now + Duration::from_secs(10)), nothing());
    assert_eq!(c.next_deadline(), None);
    assert_eq!(c.stats().mismatch, 1);
    c.checkpoint(EPOCH);
    assert_eq!(c.committed(EPOCH), vec![bad, later]);
}

#[test]
fn syn_pair_with_different_isns_matches() {
    let now = Instant::now();
    let mut c = compare();
    // The guest accepts: SYN-ACKs with their own ISNs.
    let p_syn = seg(1_000_000).syn().frame(&[]);
    let s_syn = seg(77).syn().svm().frame(&[]);
    assert_eq!(c.primary(p_syn.clone(), now), nothing());
    assert_eq!(c.secondary(EPOCH, &s_syn, now), released(&[&p_syn]));
    // Later segments: the SVM's are in the PVM's space.
    let p = seg(1_000_001).frame(b"banner");
    assert_eq!(
        c.secondary(EPOCH, &seg(1_000_001).svm().frame(b"banner"), now),
        nothing()
    );
    assert_eq!(c.primary(p.clone(), now), released(&[&p]));
    // A retransmitted SYN-ACK of the PVM: out at once; of the SVM: dropped.
    assert_eq!(c.primary(p_syn.clone(), now), released(&[&p_syn]));
    assert_eq!(c.secondary(EPOCH, &s_syn, now), nothing());
    assert_eq!(c.stats().queue_depth, 0);

    // The guest connects: a SYN without ACK, the SVM's first.
    let s_syn = seg(4242).port(50000).no_ack().syn().svm().frame(&[]);
    let p_syn = seg(99).port(50000).no_ack().syn().frame(&[]);
    assert_eq!(c.secondary(EPOCH, &s_syn, now), nothing());
    assert_eq!(c.primary(p_syn.clone(), now), released(&[&p_syn]));
    // The stream starts at the PVM's ISN + 1.
    let p = seg(100).port(50000).frame(b"GET /");
    assert_eq!(c.primary(p.clone(), now), nothing());
    let out = c.secondary(EPOCH, &seg(100).port(50000).svm().frame(b"GET /"), now);
    assert_eq!(out, released(&[&p]));
    assert_eq!(c.stats().checkpoints(Cause::Mismatch), 0);
}

#[test]
fn svm_data_before_the_pvms_syn_waits_for_its_isn() {
    let now = Instant::now();
    let mut c = compare();
    // The SVM's SYN-ACK, data and FIN all come before the PVM's SYN-ACK.
    let svm = [
        seg(9).syn().svm().frame(&[]),
        seg(501).svm().frame(b"early"),
        seg(506).svm().fin().frame(&[]),
    ];
    for f in &svm {
        assert_eq!(c.secondary(EPOCH, f, now), nothing());
    }
    assert_eq!(c.stats().queue_depth, 3);
    let pvm = [
        seg(500).syn().frame(&[]),
        seg(501).frame(b"ear"),
        seg(504).fin().frame(b"ly"),
    ];
    for f in &pvm {
        assert_eq!(c.primary(f.clone(), now), released(&[f]));
    }
    assert_eq!(c.stats().queue_depth, 0);
}

#[test]
fn a_new_syn_on_a_known_flow_is_a_mismatch() {
    let now = Instant::now();
    let mut c = compare();
    let _ = c.primary(seg(10).syn().frame(&[]), now);
    let _ = c.secondary(EPOCH, &seg(20).syn().svm().frame(&[]), now);
    let out = c.primary(seg(5000).syn().frame(&[]), now);
    assert_eq!(out.checkpoint, Some(Cause::Mismatch));
}

#[test]
fn pure_acks_wait_for_the_svms_ack() {
    let now = Instant::now();
    let mut c = compare();
    let p = seg(1).frame(b"x");
    let s = seg(1).svm().ack(ACK).frame(b"x");
    assert_eq!(c.primary(p.clone(), now), nothing());
    assert_eq!(c.secondary(EPOCH, &s, now), released(&[&p]));
    // The PVM acknowledges more of the client's data than the SVM did.
    let pure = seg(2).ack(ACK + 100).frame(&[]);
    assert_eq!(c.primary(pure.clone(), now), nothing());
    let s_ack = seg(2).svm().ack(ACK + 50).frame(&[]);
    assert_eq!(c.secondary(EPOCH, &s_ack, now), nothing());
    // A data segment behind it waits too (per-connection order), even
    // once its bytes matched.
    let data = seg(2).ack(ACK + 50).frame(b"y");
    assert_eq!(c.primary(data.clone(), now), nothing());
    assert_eq!(
        c.secondary(EPOCH, &seg(2).svm().ack(ACK + 50).frame(b"y"), now),
        nothing()
    );
    let s_ack = seg(3).svm().ack(ACK + 100).frame(&[]);
    assert_eq!(c.secondary(EPOCH, &s_ack, now), released(&[&pure, &data]));
    // Pure ACKs of the SVM wait for nothing (no queue entry, no timeout).
    assert_eq!(c.stats().queue_depth, 0);
    // Across the wrap of sequence space (another connection).
    let out = c.secondary(
        EPOCH,
        &seg(3).port(81).svm().ack(u32::MAX - 3).frame(&[]),
        now,
    );
    assert_eq!(out, nothing());
    let pure = seg(3).port(81).ack(5).frame(&[]);
    assert_eq!(c.primary(pure.clone(), now), nothing());
    let out = c.secondary(EPOCH, &seg(3).port(81).svm().ack(6).frame(&[]), now);
    assert_eq!(out, released(&[&pure]));
}

#[test]
fn fin_and_rst_wait_for_the_svms() {
    let now = Instant::now();
    let mut c = compare();
    let fin = seg(1).fin().frame(b"bye");
    assert_eq!(c.primary(fin.clone(), now), nothing());
    // The bytes alone do not release the FIN.
    assert_eq!(
        c.secondary(EPOCH, &seg(1).svm().frame(b"bye"), now),
        nothing()
    );
    let s_fin = seg(4).svm().fin().frame(&[]);
    assert_eq!(c.secondary(EPOCH, &s_fin, now), released(&[&fin]));
    // A FIN where the other side sent data: a mismatch.
    let mut c = compare();
    let _ = c.primary(seg(1).fin().frame(b"a"), now);
    let out = c.secondary(EPOCH, &seg(1).svm().frame(b"ab"), now);
    assert_eq!(out.checkpoint, Some(Cause::Mismatch));

    let mut c = compare();
    let rst = seg(1).rst().frame(&[]);
    assert_eq!(c.primary(rst.clone(), now), nothing());
    let out = c.secondary(EPOCH, &seg(9).svm().rst().frame(&[]), now);
    assert_eq!(out, released(&[&rst]));
}

#[test]
fn a_connection_seen_without_syn_starts_at_the_first_sequence_number() {
    let now = Instant::now();
    let mut c = compare();
    // The SVM first, at its current position.
    let out = c.secondary(EPOCH, &seg(u32::MAX - 1).svm().frame(b"wrap"), now);
    assert_eq!(out, nothing());
    let a = seg(u32::MAX - 1).frame(b"wr");
    let b = seg(0).frame(b"ap");
    assert_eq!(c.primary(a.clone(), now), released(&[&a]));
    assert_eq!(c.primary(b.clone(), now), released(&[&b]));
    // Bytes before the start existed at the checkpoint: a PVM
    // retransmission of them is not held.
    let old = seg(u32::MAX - 10).frame(b"old");
    assert_eq!(c.primary(old.clone(), now), released(&[&old]));
}

#[test]
fn udp_datagrams_match_in_order_by_payload() {
    let now = Instant::now();
    let mut c = compare();
    let q1 = udp(1111, 64, b"query 1");
    let q2 = udp(1111, 64, b"query 2");
    assert_eq!(c.primary(q1.clone(), now), nothing());
    assert_eq!(c.primary(q2.clone(), now), nothing());
    // TTL (and so the IP checksum) differ: not compared.
    assert_eq!(
        c.secondary(EPOCH, &udp(1111, 1, b"query 1"), now),
        released(&[&q1])
    );
    assert_eq!(
        c.secondary(EPOCH, &udp(1111, 1, b"query 2"), now),
        released(&[&q2])
    );
    assert_eq!(
        c.stats().connections,
        0,
        "an idle datagram key is forgotten"
    );
    // Another flow does not wait for this one.
    let other = udp(2222, 64, b"b");
    assert_eq!(c.primary(udp(1111, 64, b"a"), now), nothing());
    assert_eq!(c.secondary(EPOCH, &udp(2222, 64, b"b"), now), nothing());
    assert_eq!(c.primary(other.clone(), now), released(&[&other]));
    // A different payload.
    let out = c.secondary(EPOCH, &udp(1111, 64, b"A"), now);
    assert_eq!(
        out,
        Outcome {
            release: vec![],
            checkpoint: Some(Cause::Mismatch)
        }
    );
}

#[test]
fn icmp_matches_header_rest_and_payload() {
    let now = Instant::now();
    let echo = |seq: u16, ttl: u8, data: &[u8]| {
        build!(
            PacketBuilder::ethernet2(GUEST_MAC, CLIENT_MAC)
                .ipv4(GUEST, CLIENT, ttl)
                .icmpv4_echo_reply(7, seq),
            data
        )
    };
    let mut c = compare();
    let p = echo(1, 64, b"ping");
    assert_eq!(c.primary(p.clone(), now), nothing());
    assert_eq!(
        c.secondary(EPOCH, &echo(1, 60, b"ping"), now),
        released(&[&p])
    );
    // The echo sequence differs: a mismatch.
    let _ = c.primary(echo(2, 64, b"ping"), now);
    let out = c.secondary(EPOCH, &echo(3, 64, b"ping"), now);
    assert_eq!(out.checkpoint, Some(Cause::Mismatch));

    // ICMPv6 (so IPv6 neighbour discovery too).
    let echo6 = |data: &[u8]| {
        build!(
            PacketBuilder::ethernet2(GUEST_MAC, CLIENT_MAC)
                .ipv6(GUEST6, CLIENT6, 64)
                .icmpv6_echo_reply(7, 1),
            data
        )
    };
    let mut c = compare();
    let p = echo6(b"ping6");
    assert_eq!(c.secondary(EPOCH, &echo6(b"ping6"), now), nothing());
    assert_eq!(c.primary(p.clone(), now), released(&[&p]));
    let _ = c.primary(echo6(b"ping6"), now);
    let out = c.secondary(EPOCH, &echo6(b"pong6"), now);
    assert_eq!(out.checkpoint, Some(Cause::Mismatch));
}

#[test]
fn arp_and_unparsable_frames_match_whole() {
    let now = Instant::now();
    let mut c = compare();
    let who_has = arp([10, 0, 0, 2]);
    assert_eq!(c.primary(who_has.clone(), now), nothing());
    assert_eq!(c.secondary(EPOCH, &who_has, now), released(&[&who_has]));
    let garbage = vec![0xab; 9];
    assert_eq!(c.primary(garbage.clone(), now), nothing());
    assert_eq!(c.secondary(EPOCH, &garbage, now), released(&[&garbage]));
    let _ = c.primary(arp([10, 0, 0, 3]), now);
    let out = c.secondary(EPOCH, &arp([10, 0, 0, 4]), now);
    assert_eq!(out.checkpoint, Some(Cause::Mismatch));
}

#[test]
fn ipv6_tcp_is_compared_as_a_stream() {
    let now = Instant::now();
    let mut c = compare();
    let v6 = |s: Seg| Seg { ipv6: true, ..s };
    let p = v6(seg(1)).frame(b"abcdef");
    assert_eq!(c.primary(p.clone(), now), nothing());
    assert_eq!(
        c.secondary(EPOCH, &v6(seg(1)).svm().frame(b"abc"), now),
        nothing()
    );
    assert_eq!(
        c.secondary(EPOCH, &v6(seg(4)).svm().frame(b"def"), now),
        released(&[&p])
    );
}

#[test]
fn vlan_tags_are_part_of_the_key() {
    let now = Instant::now();
    let mut c = compare();
    let on = |id: u16, s: Seg| Seg {
        vlan: Some(id),
        ..s
    };
    let p = on(10, seg(1)).frame(b"tagged");
    assert_eq!(c.primary(p.clone(), now), nothing());
    // The same segment on another VLAN (or untagged) is another flow.
    assert_eq!(
        c.secondary(EPOCH, &on(11, seg(1)).svm().frame(b"tagged"), now),
        nothing()
    );
    assert_eq!(
        c.secondary(EPOCH, &seg(1).svm().frame(b"tagged"), now),
        nothing()
    );
    assert_eq!(c.stats().connections, 3);
    let s = on(10, seg(1)).svm().frame(b"tagged");
    assert_eq!(c.secondary(EPOCH, &s, now), released(&[&p]));
}

#[test]
fn a_frame_waiting_too_long_asks_for_a_checkpoint() {
    let t0 = Instant::now();
    let timeout = Duration::from_millis(DEFAULT_COMPARE_TIMEOUT_MS);
    let mut c = compare();
    assert_eq!(c.next_deadline(), None);
    let p = seg(1).frame(b"lonely");
    assert_eq!(c.primary(p.clone(), t0), nothing());
    assert_eq!(c.next_deadline(), Some(t0 + timeout));
    assert_eq!(c.poll(t0 + timeout - Duration::from_millis(1)), nothing());
    let out = c.poll(t0 + timeout);
    assert_eq!(
        out,
        Outcome {
            release: vec![],
            checkpoint: Some(Cause::Timeout)
        }
    );
    assert_eq!(
        c.next_deadline(),
        None,
        "asked: nothing to do until the checkpoint"
    );
    assert_eq!(c.poll(t0 + timeout * 10), nothing());
    assert_eq!(c.stats().timeout, 1);
    c.checkpoint(EPOCH);
    assert_eq!(c.committed(EPOCH), vec![p]);

    // An SVM frame no PVM output matches.
    let epoch = EPOCH + 1;
    let t1 = t0 + timeout * 20;
    assert_eq!(
        c.secondary(epoch, &seg(1).svm().frame(b"extra"), t1),
        nothing()
    );
    assert_eq!(c.next_deadline(), Some(t1 + timeout));
    // Any call notices the deadline, not only poll.
    let out = c.primary(seg(1).port(81).frame(b"other"), t1 + timeout);
    assert_eq!(out.checkpoint, Some(Cause::Timeout));
    assert_eq!(c.stats().timeout, 2);
}

#[test]
fn held_bytes_over_the_bound_ask_for_a_checkpoint() {
    let now = Instant::now();
    let config = CompareConfig {
        held_bytes_max: 1000,
        ..CompareConfig::default()
    };
    let mut c = Compare::new(config, EPOCH);
    let first = seg(1).frame(&payload(500, 0));
    assert_eq!(c.primary(first, now), nothing());
    let out = c.primary(seg(501).frame(&payload(500, 1)), now);
    assert_eq!(out.checkpoint, Some(Cause::HeldBytes));
    let stats = c.stats();
    assert!(stats.held_bytes > 1000);
    assert_eq!(stats.held_bytes_checkpoints, 1);
    // Closed epochs waiting for their commit do not count against the
    // next epoch: no checkpoint storm while the secondary loads.
    c.checkpoint(EPOCH);
    assert_eq!(c.primary(seg(1001).frame(b"next"), now), nothing());
    assert_eq!(c.poll(now), nothing());
    assert_eq!(c.committed(EPOCH).len(), 2);

    // A flood from the SVM: queued within the bound, the rest dropped.
    let mut c = Compare::new(config, EPOCH);
    let mut causes = Vec::new();
    for i in 0..100u16 {
        let out = c.secondary(EPOCH, &udp(i, 64, &payload(100, 0)), now);
        causes.extend(out.checkpoint);
        assert!(c.stats().queue_bytes <= 1000);
    }
    assert_eq!(causes, vec![Cause::HeldBytes]);
    let stats = c.stats();
    assert!(stats.dropped > 90, "{stats:?}");
}

#[test]
fn stale_svm_frames_are_dropped() {
    let now = Instant::now();
    let mut c = compare();
    let p = seg(1).frame(b"late");
    assert_eq!(c.primary(p.clone(), now), nothing());
    c.checkpoint(EPOCH);
    assert_eq!(c.epoch(), EPOCH + 1);
    // The SVM's twin from before it loaded the checkpoint.
    assert_eq!(
        c.secondary(EPOCH, &seg(1).svm().frame(b"late"), now),
        nothing()
    );
    let stats = c.stats();
    assert_eq!((stats.stale_dropped, stats.queue_depth), (1, 0));
    // It did not release the frame: that waits for the commit.
    assert_eq!(c.committed(EPOCH), vec![p]);
}

#[test]
fn checkpoint_and_committed_release_exactly_the_held_frames_in_order() {
    let now = Instant::now();
    let mut c = compare();
    let a = seg(1).frame(b"a");
    let b = udp(9, 64, b"b");
    let matched = udp(10, 64, b"m");
    let d = seg(2).frame(b"d");
    assert_eq!(c.primary(a.clone(), now), nothing());
    assert_eq!(c.primary(b.clone(), now), nothing());
    assert_eq!(c.secondary(EPOCH, &matched, now), nothing());
    assert_eq!(c.primary(matched.clone(), now), released(&[&matched]));
    assert_eq!(c.primary(d.clone(), now), nothing());
    c.checkpoint(EPOCH);
    // The SVM's leftovers are gone; epoch + 1 starts afresh.
    let stats = c.stats();
    assert_eq!(
        (stats.queue_depth, stats.connections, stats.held_frames),
        (0, 0, 3)
    );
    let e = seg(3).frame(b"e");
    assert_eq!(c.primary(e.clone(), now), nothing());
    c.checkpoint(EPOCH + 1);
    assert_eq!(c.committed(EPOCH - 1), Vec::<Vec<u8>>::new());
    assert_eq!(c.committed(EPOCH), vec![a, b, d]);
    assert_eq!(c.committed(EPOCH + 1), vec![e]);
    assert_eq!(c.stats().held_frames, 0);
}

#[test]
fn release_all_hands_out_everything_then_passes_through() {
    let now = Instant::now();
    let mut c = compare();
    let a = seg(1).frame(b"a");
    let b = seg(2).frame(b"b");
    let _ = c.primary(a.clone(), now);
    c.checkpoint(EPOCH);
    let _ = c.primary(b.clone(), now);
    assert_eq!(c.release_all(), vec![a, b]);
    let stats = c.stats();
    assert_eq!((stats.held_frames, stats.held_bytes), (0, 0));
    let later = seg(3).frame(b"c");
    assert_eq!(c.primary(later.clone(), now), released(&[&later]));
    assert_eq!(c.secondary(EPOCH + 1, &later, now), nothing());
    assert_eq!(c.next_deadline(), None);
}

#[test]
fn a_full_connection_table_compares_whole_frames() {
    let now = Instant::now();
    let config = CompareConfig {
        max_connections: 2,
        ..CompareConfig::default()
    };
    let mut c = Compare::new(config, EPOCH);
    let flows: Vec<Vec<u8>> = (0..5).map(|i| seg(1).port(100 + i).frame(b"x")).collect();
    for f in &flows {
        assert_eq!(c.primary(f.clone(), now), nothing());
    }
    let stats = c.stats();
    assert_eq!((stats.connections, stats.untracked), (2, 3));
    // The SVM's identical frames match, whole.
    for f in &flows {
        let out = c.secondary(EPOCH, f, now);
        assert_eq!(out, released(&[f]));
    }
    assert_eq!(c.stats().checkpoints(Cause::Mismatch), 0);
}

#[test]
fn causes_have_metric_names() {
    let names: Vec<&str> = Cause::ALL.iter().map(|c| c.name()).collect();
    assert_eq!(names, ["mismatch", "timeout", "held_bytes"]);
}

mod properties {
    use super::*;
    use crate::packet::TcpFlags;
    use proptest::prelude::*;

    /// A TCP connection both VMs carry (guest port `100 + index`).
    #[derive(Debug, Clone)]
    struct Conn {
        /// Opened in this epoch (SYN-ACKs with these ISNs), or already
        /// open at `pvm_isn + 1`.
        syn: bool,
        pvm_isn: u32,
        svm_isn: u32,
        data: Vec<u8>,
        fin: bool,
        /// Where each VM cuts the stream into segments (sorted offsets).
        pvm_cuts: Vec<usize>,
        svm_cuts: Vec<usize>,
    }

    fn conn() -> impl Strategy<Value = Conn> {
        (
            any::<(bool, u32, u32, bool)>(),
            prop::collection::vec(any::<u8>(), 0..2500),
            prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        )
            .prop_map(|((syn, pvm_isn, svm_isn, fin), data, p, s)| {
                let cuts = |ix: Vec<prop::sample::Index>| {
                    let mut c: Vec<usize> = ix.iter().map(|i| i.index(data.len() + 1)).collect();
                    c.sort_unstable();
                    c.dedup();
                    c
                };
                Conn {
                    syn,
                    pvm_isn,
                    svm_isn,
                    fin,
                    pvm_cuts: cuts(p),
                    svm_cuts: cuts(s),
                    data,
                }
            })
    }

    /// The frames one VM sends on `c`: SYN-ACK, the data cut at `cuts`,
    /// then the FIN. Sequence numbers in the PVM's space but the SYN's.
    fn segments(c: &Conn, port: u16, svm: bool, cuts: &[usize]) -> Vec<Vec<u8>> {
        let tweak = |s: Seg| if svm { s.svm() } else { s };
        let first = c.pvm_isn.wrapping_add(1);
        let mut frames = Vec::new();
        if c.syn {
            let isn = if svm { c.svm_isn } else { c.pvm_isn };
            frames.push(tweak(seg(isn).port(port).syn()).frame(&[]));
        }
        let mut bounds = vec![0];
        bounds.extend(cuts.iter().copied().filter(|&x| x > 0 && x < c.data.len()));
        bounds.push(c.data.len());
        for w in bounds.windows(2) {
            if w[1] > w[0] {
                let s = seg(first.wrapping_add(w[0] as u32)).port(port);
                frames.push(tweak(s).frame(&c.data[w[0]..w[1]]));
            }
        }
        if c.fin {
            let s = seg(first.wrapping_add(c.data.len() as u32))
                .port(port)
                .fin();
            frames.push(tweak(s).frame(&[]));
        }
        frames
    }

    /// Pops the queues in the order `picks` chooses (each queue keeps its
    /// own order); what is left after the picks goes in queue order.
    fn interleave<T>(mut queues: Vec<VecDeque<T>>, picks: &[u8]) -> Vec<(usize, T)> {
        let mut out = Vec::new();
        let mut picks = picks.iter().cycle();
        loop {
            let open: Vec<usize> = (0..queues.len())
                .filter(|&q| !queues[q].is_empty())
                .collect();
            if open.is_empty() {
                return out;
            }
            let q = open[usize::from(*picks.next().unwrap_or(&0)) % open.len()];
            out.extend(queues[q].pop_front().map(|x| (q, x)));
        }
    }

    /// The guest port (TCP) or source port (UDP) a frame belongs to.
    fn port_of(frame: &[u8]) -> u16 {
        match packet::parse(frame) {
            Ok(Packet::Tcp { key, .. } | Packet::Udp { key, .. }) => key.src_port,
            _ => 0,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Both VMs send the same connections and datagrams, each cut and
        /// interleaved its own way (the SVM sometimes repeating a
        /// segment): no checkpoint, every PVM frame released exactly once,
        /// in its connection's order.
        #[test]
        fn the_same_output_releases_everything_in_order(
            conns in prop::collection::vec(conn(), 1..4),
            datagrams in prop::collection::vec(prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..4), 0..3),
            picks in prop::collection::vec(any::<u8>(), 1..64),
            repeats in prop::collection::vec(any::<bool>(), 1..16),
        ) {
            let now = Instant::now();
            let mut c = compare();
            let mut queues: Vec<VecDeque<(bool, Vec<u8>)>> = Vec::new();
            let mut sent: HashMap<u16, Vec<Vec<u8>>> = HashMap::new();
            for (i, conn) in conns.iter().enumerate() {
                let port = 100 + i as u16;
                let pvm = segments(conn, port, false, &conn.pvm_cuts);
                sent.insert(port, pvm.clone());
                queues.push(pvm.into_iter().map(|f| (true, f)).collect());
                let mut svm = VecDeque::new();
                for (j, f) in segments(conn, port, true, &conn.svm_cuts).into_iter().enumerate() {
                    if repeats[j % repeats.len()] {
                        svm.push_back((false, f.clone()));
                    }
                    svm.push_back((false, f));
                }
                queues.push(svm);
            }
            for (i, payloads) in datagrams.iter().enumerate() {
                let port = 2000 + i as u16;
                let pvm: Vec<Vec<u8>> = payloads.iter().map(|p| udp(port, 64, p)).collect();
                sent.insert(port, pvm.clone());
                queues.push(pvm.into_iter().map(|f| (true, f)).collect());
                queues.push(payloads.iter().map(|p| (false, udp(port, 1, p))).collect());
            }
            let mut got: HashMap<u16, Vec<Vec<u8>>> = HashMap::new();
            for (_, (primary, frame)) in interleave(queues, &picks) {
                let out = if primary {
                    c.primary(frame, now)
                } else {
                    c.secondary(EPOCH, &frame, now)
                };
                prop_assert_eq!(out.checkpoint, None);
                for f in out.release {
                    got.entry(port_of(&f)).or_default().push(f);
                }
            }
            sent.retain(|_, frames| !frames.is_empty());
            prop_assert_eq!(got, sent);
            let stats = c.stats();
            prop_assert_eq!((stats.held_frames, stats.held_bytes, stats.queue_depth), (0, 0, 0));
            prop_assert_eq!(stats.matched, stats.compared);
        }

        /// One byte of the SVM's stream differs: a mismatch, and no PVM
        /// frame holding or following that byte is released.
        #[test]
        fn a_flipped_byte_is_a_mismatch_and_nothing_after_it_leaves(
            conn in conn(),
            at in any::<prop::sample::Index>(),
            xor in 1u8..,
            picks in prop::collection::vec(any::<u8>(), 1..64),
        ) {
            prop_assume!(!conn.data.is_empty());
            let now = Instant::now();
            let flip = at.index(conn.data.len());
            let mut svm_conn = conn.clone();
            svm_conn.data[flip] ^= xor;
            let pvm = segments(&conn, 80, false, &conn.pvm_cuts);
            let svm = segments(&svm_conn, 80, true, &conn.svm_cuts);
            let queues = vec![
                pvm.into_iter().map(|f| (true, f)).collect(),
                svm.into_iter().map(|f| (false, f)).collect(),
            ];
            let mut c = compare();
            let mut causes = Vec::new();
            let first = conn.pvm_isn.wrapping_add(1);
            for (_, (primary, frame)) in interleave(queues, &picks) {
                let out = if primary {
                    c.primary(frame, now)
                } else {
                    c.secondary(EPOCH, &frame, now)
                };
                causes.extend(out.checkpoint);
                for f in out.release {
                    let Ok(Packet::Tcp { seq, payload, flags, .. }) = packet::parse(&f) else {
                        return Err(TestCaseError::fail("released a non-TCP frame"));
                    };
                    if flags.contains(TcpFlags::SYN) {
                        continue;
                    }
                    let end = seq.wrapping_sub(first) as usize + payload.len();
                    prop_assert!(end <= flip, "released bytes up to {} past the flip at {}", end, flip);
                    prop_assert!(!flags.contains(TcpFlags::FIN));
                }
            }
            prop_assert_eq!(causes, vec![Cause::Mismatch]);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Primary(Vec<u8>),
        /// Epoch relative to the compared one (-1 stale, +1 future).
        Secondary(i8, Vec<u8>),
        Poll(u8),
        Checkpoint,
        Committed(u8),
        ReleaseAll,
    }

    /// Frames near what guests send (TCP and UDP on a few ports and
    /// sequence numbers, any flags), with random bytes mixed in.
    fn frame() -> impl Strategy<Value = Vec<u8>> {
        let tcp = (
            0u16..3,
            0u32..64,
            any::<u16>(),
            0u32..4,
            prop::collection::vec(0u8..3, 0..40),
        )
            .prop_map(|(port, seq, flags, ack, payload)| {
                let s = Seg {
                    syn: flags & 1 != 0,
                    fin: flags & 2 != 0,
                    rst: flags & 4 == 4 && flags & 8 != 0,
                    ack: (flags & 16 != 0).then_some(ack),
                    ..seg(seq.wrapping_mul(16)).port(port)
                };
                s.frame(&payload)
            });
        let udp =
            (0u16..3, prop::collection::vec(0u8..2, 0..8)).prop_map(|(port, p)| udp(port, 64, &p));
        prop_oneof![
            4 => tcp,
            1 => udp,
            1 => prop::collection::vec(any::<u8>(), 0..80),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => frame().prop_map(Op::Primary),
            8 => ((-1i8..=1), frame()).prop_map(|(e, f)| Op::Secondary(e, f)),
            2 => any::<u8>().prop_map(Op::Poll),
            1 => Just(Op::Checkpoint),
            1 => any::<u8>().prop_map(Op::Committed),
            1 => Just(Op::ReleaseAll),
        ]
    }

    proptest! {
        /// Any frames and calls: no panic; queued SVM bytes and the table
        /// stay within their bounds; every PVM frame comes out exactly
        /// once in the end; a held frame always has a deadline until a
        /// checkpoint is asked for, and poll past it asks.
        #[test]
        fn any_frames_keep_the_bounds(ops in prop::collection::vec(op(), 0..150)) {
            let config = CompareConfig {
                timeout: Duration::from_millis(20),
                held_bytes_max: 3000,
                max_connections: 4,
            };
            let t0 = Instant::now();
            let mut now = t0;
            let mut c = Compare::new(config, EPOCH);
            let mut asked = false;
            let (mut sent, mut out) = (0u64, 0u64);
            // Frames of the compared epoch in and out, and waiting ones.
            let (mut epoch_in, mut epoch_out) = (0u64, 0u64);
            let mut waiting: VecDeque<(u64, u64)> = VecDeque::new();
            let mut passing = false;
            for op in ops {
                let outcome = match op {
                    Op::Primary(f) => {
                        sent += 1;
                        epoch_in += 1;
                        c.primary(f, now)
                    }
                    Op::Secondary(rel, f) => {
                        let epoch = c.epoch().wrapping_add_signed(i64::from(rel));
                        c.secondary(epoch, &f, now)
                    }
                    Op::Poll(ms) => {
                        now += Duration::from_millis(u64::from(ms));
                        let deadline = c.next_deadline();
                        let o = c.poll(now);
                        if deadline.is_some_and(|d| d <= now) {
                            prop_assert!(o.checkpoint.is_some(), "poll past the deadline asked nothing");
                        }
                        o
                    }
                    Op::Checkpoint => {
                        if !passing {
                            waiting.push_back((c.epoch(), epoch_in - epoch_out));
                        }
                        c.checkpoint(c.epoch());
                        asked = false;
                        epoch_in = 0;
                        epoch_out = 0;
                        Outcome::default()
                    }
                    Op::Committed(back) => {
                        let epoch = c.epoch().saturating_sub(u64::from(back % 3));
                        let frames = c.committed(epoch).len() as u64;
                        let mut expected = 0;
                        while waiting.front().is_some_and(|(e, _)| *e <= epoch) {
                            expected += waiting.pop_front().map_or(0, |(_, n)| n);
                        }
                        prop_assert_eq!(frames, expected);
                        out += frames;
                        Outcome::default()
                    }
                    Op::ReleaseAll => {
                        out += c.release_all().len() as u64;
                        waiting.clear();
                        passing = true;
                        epoch_in = 0;
                        epoch_out = 0;
                        Outcome::default()
                    }
                };
                if passing {
                    epoch_in = 0;
                } else {
                    epoch_out += outcome.release.len() as u64;
                }
                out += outcome.release.len() as u64;
                if outcome.checkpoint.is_some() {
                    prop_assert!(!asked, "a second cause in one epoch");
                    asked = true;
                }
                let stats = c.stats();
                prop_assert!(stats.queue_bytes <= config.held_bytes_max);
                prop_assert!(stats.connections <= config.max_connections as u64);
                let held_now = epoch_in - epoch_out;
                let held_waiting: u64 = waiting.iter().map(|(_, n)| n).sum();
                prop_assert_eq!(stats.held_frames, held_now + held_waiting);
                if held_now > 0 && !asked && !passing {
                    prop_assert!(c.next_deadline().is_some(), "a held frame without a deadline");
                }
            }
            out += c.release_all().len() as u64;
            prop_assert_eq!(out, sent);
            prop_assert_eq!(c.stats().held_bytes, 0);
        }
    }
}
