//! Packet-level tests of the XDP datapath through `BPF_PROG_TEST_RUN`, provisioned through
//! the daemon's own control plane. Each table row: input frame, expected verdict, expected
//! output frame (checksums recomputed from scratch and compared).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use clb::{
    control::model::{BackendSpec, Forward, Kind, ListenerSpec, Proto, Sched, TablesSpec},
    datapath::SessionTable,
    sched::{Member, maglev},
};
use clb_common::{
    CONN_FIN, CONN_OPEN, CONN_RST, ConnKey, ConnValue, HALF_ADOPTED, HALF_SYN, HALF_UDP,
    HalfOpenValue, HalfSlot, PROTO_TCP, PROTO_UDP, SLOT_WAYS, SessionKey, client_hash, ip_to_be,
    port_to_be, prefix_mask_be, slot_sets, slots::Slot,
};
use clb_tests::{
    lab::{
        Fixture, PacketLab, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, ago, backend, backend_mac,
        with_lab, with_lab_tables,
    },
    packet::{self, ACK, CLIENT_MAC, FIN, FrameSpec, LB_MAC, PSH, RST, SYN, icmp_error, parse},
};

const VIP: &str = "10.0.0.100:80";
const UDP_VIP: &str = "10.0.0.100:53";

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new("10.0.1.2".parse().unwrap(), port)
}

fn l4(l: &mut ListenerSpec) -> &mut clb::control::model::L4Spec {
    match &mut l.kind {
        Kind::L4(k) => k,
        Kind::Http(_) => unreachable!("an L4 listener"),
    }
}

fn web(persist: u32) -> ListenerSpec {
    let mut l = ListenerSpec::new("web", sa(VIP), Proto::Tcp);
    l.persist = persist;
    l.backends = (2..=4)
        .map(|n| BackendSpec::new(backend(n, 8080), 10))
        .collect();
    l
}

fn dns() -> ListenerSpec {
    let mut l = ListenerSpec::new("dns", sa(UDP_VIP), Proto::Udp);
    l.backends = (5..=6)
        .map(|n| BackendSpec::new(backend(n, 5353), 10))
        .collect();
    l
}

/// `spec` as the balancer must forward it to backend `10.1.0.n:port` (NAT).
fn to_backend(lab: &PacketLab, spec: &FrameSpec, n: u8, port: u16) -> Vec<u8> {
    let mut s = spec.clone();
    s.dst = backend(n, port);
    s.ttl -= 1;
    s.src_mac = lab.backend_if_mac;
    s.dst_mac = backend_mac(n);
    s.build()
}

/// `spec` as the balancer must forward it to backend `10.1.0.n` with DSR: MACs and TTL only.
fn dsr_to(lab: &PacketLab, spec: &FrameSpec, n: u8) -> Vec<u8> {
    let mut s = spec.clone();
    s.ttl -= 1;
    s.src_mac = lab.backend_if_mac;
    s.dst_mac = backend_mac(n);
    s.build()
}

/// The backend whose address the forwarded frame carries.
fn backend_of(frame: &[u8]) -> u8 {
    parse(frame).unwrap().dst.ip().octets()[3]
}

/// The backend a DSR frame goes to (by its destination MAC).
fn dsr_backend_of(frame: &[u8]) -> u8 {
    frame[5]
}

fn conn_key(lab: &PacketLab, listener: &str, client: SocketAddrV4, proto: u8) -> ConnKey {
    ConnKey {
        client: ip_to_be(client.ip().octets()),
        client_port: port_to_be(client.port()),
        listener: lab.listener_id(listener),
        proto,
        _pad: [0; 3],
    }
}

fn session_key(lab: &PacketLab, listener: &str, client: Ipv4Addr) -> SessionKey {
    SessionKey {
        client: ip_to_be(client.octets()),
        listener: lab.listener_id(listener),
        _pad: 0,
    }
}

fn backdate_conn(lab: &PacketLab, key: &ConnKey, secs: u64) {
    let v = lab.conn(key).expect("connection entry");
    lab.put_conn(
        *key,
        ConnValue {
            last_seen_ns: ago(secs),
            ..v
        },
    );
}

/// The reply of backend `n` (port) to `client` for the flow `f`, as the backend sends it.
fn reply_from(lab: &PacketLab, n: u8, port: u16, to: SocketAddrV4, flags: u8) -> FrameSpec {
    let mut r = FrameSpec::tcp(backend(n, port), to, flags);
    r.src_mac = backend_mac(n);
    r.dst_mac = lab.backend_if_mac;
    r
}

/// The backend's initial sequence number in the fixtures' SYN-ACKs: the default client ACK
/// (`FrameSpec::tcp`, ack 2000) acknowledges it.
const BACKEND_ISN: u32 = 1999;

/// Backend `n` (port 8080) answers `c`'s SYN with a SYN-ACK of [`BACKEND_ISN`]; it must be
/// NATed back to the client.
fn syn_ack(lab: &PacketLab, n: u8, c: SocketAddrV4) {
    let mut r = reply_from(lab, n, 8080, c, SYN | ACK);
    r.seq = BACKEND_ISN;
    r.ack = 1001;
    let (v, out) = lab.run_on(lab.backend_if, &r.build());
    assert_eq!(v, XDP_REDIRECT, "SYN-ACK NATed back to the client");
    assert_eq!(parse(&out).unwrap().src, sa(VIP), "SYN-ACK from the VIP");
}

/// The lab backend number (`backend(n, 8080)`) of a half-open entry of listener "web".
fn half_backend_n(lab: &PacketLab, h: &HalfOpenValue) -> u8 {
    (2..=9)
        .find(|n| lab.backend_id("web", backend(*n, 8080)) == u32::from(h.backend))
        .expect("a lab backend")
}

/// Opens a verified TCP connection of `c` (SYN, the backend's SYN-ACK, the client's ACK that
/// acknowledges it); returns its backend.
fn handshake(lab: &PacketLab, c: SocketAddrV4) -> u8 {
    let (v, out) = lab.run(&FrameSpec::tcp(c, sa(VIP), SYN).build());
    assert_eq!(v, XDP_REDIRECT, "SYN forwarded");
    let n = backend_of(&out);
    syn_ack(lab, n, c);
    let (v, out) = lab.run(&FrameSpec::tcp(c, sa(VIP), ACK).build());
    assert_eq!(v, XDP_REDIRECT, "handshake ACK forwarded");
    assert_eq!(
        backend_of(&out),
        n,
        "the handshake stays where its SYN went"
    );
    n
}

#[test]
fn a_syn_writes_only_the_half_open_table_and_its_ack_promotes_it() {
    with_lab(|lab| {
        lab.apply(vec![web(0)]);
        // Three new connections of one client go to the three backends in turn.
        let syns: Vec<FrameSpec> = (0..3)
            .map(|i| FrameSpec::tcp(client(40000 + i), sa(VIP), SYN))
            .collect();
        let order = [2u8, 3, 4];
        let rows: Vec<Fixture> = syns
            .iter()
            .zip(order)
            .map(|(s, n)| {
                Fixture::rewritten(
                    "new TCP SYN: destination NAT to the next backend, TTL-1, next-hop MAC",
                    s.build(),
                    XDP_REDIRECT,
                    to_backend(lab, s, n, 8080),
                )
            })
            .collect();
        lab.check(&rows);
        assert_eq!(lab.count_conns(), 0, "a SYN writes no connection entry");
        assert_eq!(lab.count_half_open(), 3);
        let key = conn_key(lab, "web", client(40000), PROTO_TCP);
        assert_eq!(lab.half_open(&key).unwrap().kind, HALF_SYN);
        // A retransmitted SYN stays on its backend, whatever the round robin says.
        lab.check(&[Fixture::rewritten(
            "retransmitted SYN: same backend",
            syns[1].build(),
            XDP_REDIRECT,
            to_backend(lab, &syns[1], 3, 8080),
        )]);
        // The backends answer with their SYN-ACKs; the client's ACK of each promotes its flow;
        // later packets stay on the backend.
        for (i, n) in order.iter().enumerate() {
            syn_ack(lab, *n, client(40000 + i as u16));
        }
        let mut rows = Vec::new();
        for (i, n) in order.iter().enumerate().rev() {
            let ack = FrameSpec::tcp(client(40000 + i as u16), sa(VIP), ACK);
            rows.push(Fixture::rewritten(
                "handshake ACK: promoted, same backend",
                ack.build(),
                XDP_REDIRECT,
                to_backend(lab, &ack, *n, 8080),
            ));
            let data = FrameSpec::tcp(client(40000 + i as u16), sa(VIP), ACK | PSH)
                .payload(b"GET / HTTP/1.1\r\n\r\n");
            rows.push(Fixture::rewritten(
                "established flow: same backend",
                data.build(),
                XDP_REDIRECT,
                to_backend(lab, &data, *n, 8080),
            ));
        }
        lab.check(&rows);
        assert_eq!(lab.count_conns(), 3);
        assert_eq!(
            lab.count_half_open(),
            0,
            "promoted entries leave the half-open table"
        );
        assert_eq!(lab.conn(&key).unwrap().state, CONN_OPEN);
        assert_eq!(lab.counter("half_open_promote"), 3);
        let c = lab.listener_counters("web");
        assert_eq!(c.new_conns, 3);
        assert_eq!(c.fwd_packets, 10);
    });
}

#[test]
fn a_blind_ack_proves_nothing_only_the_ack_of_the_backends_syn_ack_does() {
    with_lab(|lab| {
        lab.apply(vec![web(600)]);
        let c = client(40100);
        let key = conn_key(lab, "web", c, PROTO_TCP);
        let skey = session_key(lab, "web", *c.ip());
        let (v, out) = lab.run(&FrameSpec::tcp(c, sa(VIP), SYN).build());
        assert_eq!(v, XDP_REDIRECT);
        let n = backend_of(&out);
        // An ACK before any SYN-ACK (a spoofer's SYN + ACK pair): forwarded, nothing written.
        let blind = FrameSpec::tcp(c, sa(VIP), ACK);
        lab.check(&[Fixture::rewritten(
            "ACK before the SYN-ACK: forwarded to the SYN's backend, not promoted",
            blind.build(),
            XDP_REDIRECT,
            to_backend(lab, &blind, n, 8080),
        )]);
        assert!(lab.conn(&key).is_none(), "a blind ACK writes no connection");
        assert_eq!(lab.counter("half_open_unproven"), 1);
        // The backend's SYN-ACK records its sequence number; an ACK of another number still
        // proves nothing, and the backend's RST that answers it ends nothing.
        syn_ack(lab, n, c);
        let h = lab.half_open(&key).expect("half-open entry");
        assert_eq!(h.backend_isn, BACKEND_ISN);
        let mut wrong = FrameSpec::tcp(c, sa(VIP), ACK);
        wrong.ack = 0x1234_5678;
        assert_eq!(lab.run(&wrong.build()).0, XDP_REDIRECT);
        assert!(
            lab.conn(&key).is_none(),
            "a wrong acknowledgment number proves nothing"
        );
        assert_eq!(lab.counter("half_open_unproven"), 2);
        let rst = reply_from(lab, n, 8080, c, RST);
        assert_eq!(lab.run_on(lab.backend_if, &rst.build()).0, XDP_REDIRECT);
        assert!(
            lab.half_open(&key).is_some(),
            "the backend's RST ends nothing"
        );
        assert!(
            lab.session(SessionTable::Verified, &skey).is_none(),
            "no persistence without proof"
        );
        assert_eq!(lab.counter("half_open_promote"), 0);
        // The client's own ACK acknowledges the SYN-ACK: promoted, persistence committed.
        let ack = FrameSpec::tcp(c, sa(VIP), ACK);
        assert_eq!(ack.ack, BACKEND_ISN + 1);
        assert_eq!(lab.run(&ack.build()).0, XDP_REDIRECT);
        assert_eq!(lab.conn(&key).unwrap().state, CONN_OPEN);
        assert!(lab.session(SessionTable::Verified, &skey).is_some());
        assert_eq!(lab.counter("half_open_promote"), 1);

        // A handshake whose SYN-ACK was not recorded is proven by the backend's first normal
        // segment (its socket is established, which a spoofed handshake never gets to).
        let c2 = client(40101);
        let key2 = conn_key(lab, "web", c2, PROTO_TCP);
        let (_, out) = lab.run(&FrameSpec::tcp(c2, sa(VIP), SYN).build());
        let n2 = backend_of(&out);
        assert_eq!(
            lab.run(&FrameSpec::tcp(c2, sa(VIP), ACK).build()).0,
            XDP_REDIRECT
        );
        assert!(lab.conn(&key2).is_none());
        let data = reply_from(lab, n2, 8080, c2, ACK | PSH).payload(b"220 ready\r\n");
        assert_eq!(lab.run_on(lab.backend_if, &data.build()).0, XDP_REDIRECT);
        assert_eq!(
            lab.conn(&key2).unwrap().state,
            CONN_OPEN,
            "promoted by the backend"
        );
    });
}

#[test]
fn on_dsr_a_syn_and_ack_pair_proves_nothing_a_data_segment_after_it_does() {
    with_lab(|lab| {
        let mut l = ListenerSpec::new("dsr", sa(VIP), Proto::Tcp);
        l4(&mut l).forward = Forward::Dsr;
        l.persist = 600;
        l.backends = (2..=3)
            .map(|n| BackendSpec::new(backend(n, 80), 10))
            .collect();
        lab.apply(vec![l]);
        let c = client(50100);
        let key = conn_key(lab, "dsr", c, PROTO_TCP);
        let skey = session_key(lab, "dsr", *c.ip());
        let (_, out) = lab.run(&FrameSpec::tcp(c, sa(VIP), SYN).build());
        let n = dsr_backend_of(&out);
        // The handshake's ACK (clb never sees the SYN-ACK: nothing to check it against).
        let ack = FrameSpec::tcp(c, sa(VIP), ACK);
        lab.check(&[Fixture::rewritten(
            "DSR: handshake ACK, forwarded, not promoted",
            ack.build(),
            XDP_REDIRECT,
            dsr_to(lab, &ack, n),
        )]);
        assert!(
            lab.conn(&key).is_none(),
            "a SYN + ACK pair writes no connection"
        );
        assert!(lab.session(SessionTable::Verified, &skey).is_none());
        let h = lab.half_open(&key).expect("still unverified");
        assert_ne!(h.flags & clb_common::HALF_F_ACKED, 0);
        // Another bare ACK proves nothing either; a data segment does.
        assert_eq!(lab.run(&ack.build()).0, XDP_REDIRECT);
        assert!(lab.conn(&key).is_none());
        let data = data_of(c);
        lab.check(&[Fixture::rewritten(
            "DSR: first data segment: promoted",
            data.build(),
            XDP_REDIRECT,
            dsr_to(lab, &data, n),
        )]);
        assert_eq!(lab.conn(&key).unwrap().state, CONN_OPEN);
        assert!(lab.session(SessionTable::Verified, &skey).is_some());
    });
}

#[test]
fn reply_path_rewrites_source_back_to_the_vip() {
    with_lab(|lab| {
        lab.apply(vec![web(0)]);
        let n = handshake(lab, client(41000));
        let reply = reply_from(lab, n, 8080, client(41000), ACK | PSH).payload(b"200 OK");
        let mut expected = reply.clone();
        expected.src = sa(VIP);
        expected.ttl -= 1;
        expected.src_mac = lab.client_if_mac;
        expected.dst_mac = CLIENT_MAC;
        let backend_if = lab.backend_if;
        lab.check(&[
            Fixture::rewritten(
                "reply: source NAT back to the VIP",
                reply.build(),
                XDP_REDIRECT,
                expected.build(),
            )
            .on(backend_if),
            // A backend packet to a client port with no flow is not ours: pass.
            Fixture::unchanged(
                "backend packet without a flow passes",
                {
                    let mut r = reply.clone();
                    r.dst = client(41001);
                    r.build()
                },
                XDP_PASS,
            )
            .on(backend_if),
        ]);
        assert_eq!(lab.counter("reply_no_conn"), 1);
    });
}

#[test]
fn parallel_syns_of_a_new_client_share_a_backend_and_persistence_commits_on_the_handshake() {
    with_lab(|lab| {
        lab.apply(vec![web(1)]);
        // Six SYNs at once, before any handshake completes (a browser): one backend.
        let mut backends = Vec::new();
        for port in 42000..42006 {
            let (v, out) = lab.run(&FrameSpec::tcp(client(port), sa(VIP), SYN).build());
            assert_eq!(v, XDP_REDIRECT);
            backends.push(backend_of(&out));
            // Other clients advance the round robin in between.
            let other = FrameSpec::tcp(
                SocketAddrV4::new([10, 2, 0, 9 + (port % 2) as u8].into(), port),
                sa(VIP),
                SYN,
            );
            assert_eq!(lab.run(&other.build()).0, XDP_REDIRECT);
        }
        let n = backends[0];
        assert!(backends.iter().all(|b| *b == n), "{backends:?}");
        let skey = session_key(lab, "web", *client(0).ip());
        assert!(lab.session(SessionTable::Pending, &skey).is_some());
        assert!(
            lab.session(SessionTable::Verified, &skey).is_none(),
            "no verified entry before a handshake completes"
        );
        // The first completed handshake commits the client.
        syn_ack(lab, n, client(42000));
        let ack = FrameSpec::tcp(client(42000), sa(VIP), ACK);
        lab.check(&[Fixture::rewritten(
            "handshake ACK",
            ack.build(),
            XDP_REDIRECT,
            to_backend(lab, &ack, n, 8080),
        )]);
        assert_eq!(
            lab.session(SessionTable::Verified, &skey).unwrap().backend,
            lab.backend_id("web", backend(n, 8080))
        );
        for port in 42010..42013 {
            let s = FrameSpec::tcp(client(port), sa(VIP), SYN);
            lab.check(&[Fixture::rewritten(
                "new flow of a persisted client: its backend",
                s.build(),
                XDP_REDIRECT,
                to_backend(lab, &s, n, 8080),
            )]);
        }
        let before = lab.listener_counters("web");
        assert_eq!(before.session_new, 1);
        // persist = 1 s: after 1.5 s of silence (1 s + the 0.25 s refresh slack) the entry is
        // expired and the client's next connection is scheduled afresh.
        std::thread::sleep(Duration::from_millis(1500));
        let c = client(42020);
        handshake(lab, c);
        let after = lab.listener_counters("web");
        assert_eq!(
            after.session_hits, before.session_hits,
            "no hit on an expired entry"
        );
        assert_eq!(
            after.session_new,
            before.session_new + 1,
            "client rescheduled"
        );
    });
}

#[test]
fn a_quiescent_backend_gets_no_new_clients_but_keeps_its_flows() {
    with_lab(|lab| {
        lab.apply(vec![web(600)]);
        let n = handshake(lab, client(43000));
        let mut cfg = web(600);
        for b in &mut cfg.backends {
            if b.addr == backend(n, 8080).into() {
                b.weight = 0;
            }
        }
        lab.apply(vec![cfg]);
        // The persisted client's new connection is rescheduled elsewhere.
        for port in 43001..43006 {
            let (v, out) = lab.run(&FrameSpec::tcp(client(port), sa(VIP), SYN).build());
            assert_eq!(v, XDP_REDIRECT);
            assert_ne!(
                backend_of(&out),
                n,
                "no new connection to the quiescent backend"
            );
        }
        // Its established flow goes on.
        let data = FrameSpec::tcp(client(43000), sa(VIP), ACK).payload(b"x");
        lab.check(&[Fixture::rewritten(
            "established flow on a quiescent backend continues",
            data.build(),
            XDP_REDIRECT,
            to_backend(lab, &data, n, 8080),
        )]);
    });
}

/// The RST the datapath builds in answer to `ack` (an ACK segment).
fn expected_rst(ack: &FrameSpec, c: SocketAddrV4) -> Vec<u8> {
    let mut rst = FrameSpec::tcp(sa(VIP), c, RST);
    rst.src_mac = LB_MAC;
    rst.dst_mac = CLIENT_MAC;
    rst.seq = ack.ack; // RFC 9293: <SEQ=SEG.ACK><CTL=RST>
    rst.ack = 0;
    rst.frag = 0x4000;
    let mut f = rst.build();
    // The RST is built in place: IP id 0, window 0.
    f[18] = 0;
    f[19] = 0;
    let ip_ck = clb_tests::packet::checksum(&{
        let mut h = f[14..34].to_vec();
        h[10] = 0;
        h[11] = 0;
        h
    });
    f[24..26].copy_from_slice(&ip_ck.to_be_bytes());
    f[48] = 0;
    f[49] = 0;
    f[50] = 0;
    f[51] = 0;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&f[26..34]);
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&f[34..54]);
    let tcp_ck = clb_tests::packet::checksum(&pseudo);
    f[50..52].copy_from_slice(&tcp_ck.to_be_bytes());
    f
}

#[test]
fn idle_timeout_and_closing_states_expire_connections() {
    with_lab(|lab| {
        let mut l = web(0);
        l4(&mut l).idle_timeout = Some(20);
        lab.apply(vec![l]);
        let c = client(44000);
        let n = handshake(lab, c);
        let key = conn_key(lab, "web", c, PROTO_TCP);
        // Idle 19 s: still established.
        backdate_conn(lab, &key, 19);
        let ack = FrameSpec::tcp(c, sa(VIP), ACK);
        lab.check(&[Fixture::rewritten(
            "idle below the timeout: forwarded",
            ack.build(),
            XDP_REDIRECT,
            to_backend(lab, &ack, n, 8080),
        )]);
        // Idle 22 s (> 20 + slack): the entry counts as absent, the client gets a RST.
        backdate_conn(lab, &key, 22);
        lab.check(&[Fixture::rewritten(
            "idle past the timeout: no connection, RST back to the client",
            ack.build(),
            XDP_TX,
            expected_rst(&ack, c),
        )]);
        assert_eq!(lab.counter("rst_sent"), 1);

        // FIN: the entry moves to the FIN state (which caps its life at 120 s).
        let c2 = client(44001);
        let n2 = handshake(lab, c2);
        let fin = FrameSpec::tcp(c2, sa(VIP), FIN | ACK);
        lab.check(&[Fixture::rewritten(
            "FIN: forwarded",
            fin.build(),
            XDP_REDIRECT,
            to_backend(lab, &fin, n2, 8080),
        )]);
        let key2 = conn_key(lab, "web", c2, PROTO_TCP);
        assert_eq!(lab.conn(&key2).unwrap().state, CONN_FIN);
        // A SYN reusing the ports of a closed connection starts a new flow: SYNs never look
        // at the connection table, so the closed entry stays until the new handshake's ACK
        // replaces it with the backend the SYN chose.
        let old_backend = lab.conn(&key2).unwrap().backend;
        let (v, _) = lab.run(&FrameSpec::tcp(c2, sa(VIP), SYN).build());
        assert_eq!(v, XDP_REDIRECT);
        let half = lab
            .half_open(&key2)
            .expect("the new handshake's half-open entry");
        assert_eq!(half.kind, HALF_SYN);
        assert_eq!(
            lab.conn(&key2).unwrap().state,
            CONN_FIN,
            "untouched until the ACK"
        );
        syn_ack(lab, half_backend_n(lab, &half), c2);
        let (v, out) = lab.run(&FrameSpec::tcp(c2, sa(VIP), ACK).build());
        assert_eq!(v, XDP_REDIRECT);
        let reused = lab.conn(&key2).expect("promoted");
        assert_eq!(
            (reused.state, reused.backend),
            (CONN_OPEN, u32::from(half.backend)),
            "the new handshake's ACK took over the closed entry (it was on {old_backend})"
        );
        let chosen = (2..=4)
            .map(|n| backend(n, 8080))
            .find(|b| lab.backend_id("web", *b) == u32::from(half.backend));
        assert_eq!(
            Some(parse(&out).unwrap().dst),
            chosen,
            "the ACK went where the new SYN went"
        );
        assert!(lab.half_open(&key2).is_none());
    });
}

#[test]
fn a_blind_rst_shortens_nothing_once_both_ends_keep_talking() {
    with_lab(|lab| {
        let mut l = web(0);
        l4(&mut l).idle_timeout = Some(3600);
        lab.apply(vec![l]);
        let c = client(44100);
        let n = handshake(lab, c);
        let key = conn_key(lab, "web", c, PROTO_TCP);
        // A spoofed RST "from the client" (random sequence number, forwarded: clb does not
        // check sequence windows): the flow moves to the short RST timeout...
        let mut rst = FrameSpec::tcp(c, sa(VIP), RST);
        rst.seq = 0xdead_beef;
        lab.check(&[Fixture::rewritten(
            "RST: forwarded",
            rst.build(),
            XDP_REDIRECT,
            to_backend(lab, &rst, n, 8080),
        )]);
        assert_eq!(lab.conn(&key).unwrap().state, CONN_RST);
        // ... a normal client packet alone does not bring it back (it could be spoofed too) ...
        let data = FrameSpec::tcp(c, sa(VIP), ACK | PSH).payload(b"more");
        assert_eq!(lab.run(&data.build()).0, XDP_REDIRECT);
        assert_eq!(lab.conn(&key).unwrap().state, CONN_RST);
        // ... but normal packets from both ends do.
        let reply = reply_from(lab, n, 8080, c, ACK | PSH).payload(b"ok");
        assert_eq!(lab.run_on(lab.backend_if, &reply.build()).0, XDP_REDIRECT);
        assert_eq!(
            lab.conn(&key).unwrap().state,
            CONN_OPEN,
            "both ends talk: open again"
        );
        // An RST that is the real end (no more traffic): the entry ages out after 10 s.
        assert_eq!(lab.run(&rst.build()).0, XDP_REDIRECT);
        backdate_conn(lab, &key, 11);
        let (v, _) = lab.run(&data.build());
        assert_eq!(v, XDP_TX, "an RST 11 s ago with silence since: gone, RST");
        // The same from the backend's side.
        let c2 = client(44101);
        let n2 = handshake(lab, c2);
        let key2 = conn_key(lab, "web", c2, PROTO_TCP);
        let brst = reply_from(lab, n2, 8080, c2, RST);
        assert_eq!(lab.run_on(lab.backend_if, &brst.build()).0, XDP_REDIRECT);
        assert_eq!(lab.conn(&key2).unwrap().state, CONN_RST);
        assert_eq!(lab.run(&data_of(c2).build()).0, XDP_REDIRECT);
        let r2 = reply_from(lab, n2, 8080, c2, ACK);
        assert_eq!(lab.run_on(lab.backend_if, &r2.build()).0, XDP_REDIRECT);
        assert_eq!(lab.conn(&key2).unwrap().state, CONN_OPEN);
    });
}

fn data_of(c: SocketAddrV4) -> FrameSpec {
    FrameSpec::tcp(c, sa(VIP), ACK | PSH).payload(b"data")
}

#[test]
fn mid_stream_packets_without_state_are_adopted_or_reset() {
    with_lab(|lab| {
        lab.apply(vec![web(600)]);
        let n = handshake(lab, client(45000));
        // A flow the tables never saw, of a persisted client: sent where the client is
        // persisted, adopted as unverified, promoted when the backend answers normally.
        let mid = FrameSpec::tcp(client(45999), sa(VIP), ACK).payload(b"data");
        lab.check(&[Fixture::rewritten(
            "mid-stream, persisted client: adopted",
            mid.build(),
            XDP_REDIRECT,
            to_backend(lab, &mid, n, 8080),
        )]);
        let key = conn_key(lab, "web", client(45999), PROTO_TCP);
        assert_eq!(lab.half_open(&key).unwrap().kind, HALF_ADOPTED);
        assert!(lab.conn(&key).is_none());
        // A backend RST (it does not know the flow either) verifies nothing.
        let brst = reply_from(lab, n, 8080, client(45999), RST);
        assert_eq!(lab.run_on(lab.backend_if, &brst.build()).0, XDP_REDIRECT);
        assert!(lab.conn(&key).is_none(), "a backend RST promotes nothing");
        let answer = reply_from(lab, n, 8080, client(45999), ACK).payload(b"ok");
        assert_eq!(lab.run_on(lab.backend_if, &answer.build()).0, XDP_REDIRECT);
        assert_eq!(
            lab.conn(&key).unwrap().state,
            CONN_OPEN,
            "answered: verified"
        );
        assert_eq!(lab.counter("adopted"), 1);

        // Without persistence (round robin), a mid-stream packet of an unknown flow gets a
        // RST; a stray RST is dropped, not answered.
        lab.apply(vec![web(0)]);
        let c = SocketAddrV4::new("10.2.0.7".parse().unwrap(), 1);
        let ack = FrameSpec::tcp(c, sa(VIP), ACK);
        lab.check(&[
            Fixture::rewritten("unknown flow, round robin: RST", ack.build(), XDP_TX, {
                let mut f = expected_rst(&ack, c);
                f[0..6].copy_from_slice(&CLIENT_MAC);
                f
            }),
            Fixture::unchanged(
                "stray RST: dropped",
                FrameSpec::tcp(c, sa(VIP), RST).build(),
                XDP_DROP,
            ),
        ]);
        assert_eq!(lab.counter("drop_stray_rst"), 1);
    });
}

#[test]
fn rsts_are_rate_limited() {
    let tables = TablesSpec {
        rst_per_sec: 3,
        ..TablesSpec::default()
    };
    with_lab_tables(tables, |lab| {
        lab.apply(vec![web(0)]);
        let mut sent = 0;
        for p in 0..20u16 {
            let ack = FrameSpec::tcp(
                SocketAddrV4::new([10, 2, 1, 1].into(), 1000 + p),
                sa(VIP),
                ACK,
            );
            let (v, _) = lab.run(&ack.build());
            if v == XDP_TX {
                sent += 1;
            } else {
                assert_eq!(v, XDP_DROP);
            }
        }
        // The bucket holds one second's worth (3) plus what refills during the loop.
        assert!((3..=4).contains(&sent), "{sent} RSTs sent");
        assert_eq!(lab.counter("drop_rst_rate"), 20 - sent);
    });
}

#[test]
fn every_spoof_rule_drops_before_any_state_is_written() {
    with_lab(|lab| {
        let mut l = web(600);
        l.backends.push(BackendSpec::new(backend(7, 8080), 10));
        let mut echo = ListenerSpec::new("echo", sa("10.0.0.100:7"), Proto::Udp);
        echo.backends = vec![
            BackendSpec::new(backend(5, 7), 10),
            BackendSpec::new(backend(6, 7), 10),
        ];
        lab.apply(vec![l, echo]);
        let syn = |src: &str| {
            FrameSpec::tcp(SocketAddrV4::new(src.parse().unwrap(), 5555), sa(VIP), SYN).build()
        };
        let rows = vec![
            Fixture::unchanged("source 127.0.0.1 (loopback)", syn("127.0.0.1"), XDP_DROP),
            Fixture::unchanged("source 0.0.0.0", syn("0.0.0.0"), XDP_DROP),
            Fixture::unchanged("source 0.1.2.3 (this network)", syn("0.1.2.3"), XDP_DROP),
            Fixture::unchanged("source 224.0.0.1 (multicast)", syn("224.0.0.1"), XDP_DROP),
            Fixture::unchanged("source 240.0.0.1 (reserved)", syn("240.0.0.1"), XDP_DROP),
            Fixture::unchanged(
                "source 255.255.255.255 (broadcast)",
                syn("255.255.255.255"),
                XDP_DROP,
            ),
            Fixture::unchanged("source: the VIP itself", syn("10.0.0.100"), XDP_DROP),
            Fixture::unchanged(
                "source: a backend (to a VIP: a loop)",
                syn("10.1.0.7"),
                XDP_DROP,
            ),
            Fixture::unchanged(
                "source: the balancer's own address",
                syn("10.0.1.1"),
                XDP_DROP,
            ),
            // The one-datagram loop: VIP:7 → VIP:7 (UDP echo).
            Fixture::unchanged(
                "UDP from VIP:7 to VIP:7",
                FrameSpec::udp(sa("10.0.0.100:7"), sa("10.0.0.100:7"), b"loop").build(),
                XDP_DROP,
            ),
            // A backend's echo reply sent to the VIP (as if it were a client).
            Fixture::unchanged(
                "UDP from a backend to VIP:7",
                FrameSpec::udp(backend(5, 7), sa("10.0.0.100:7"), b"loop").build(),
                XDP_DROP,
            ),
        ];
        lab.check(&rows);
        assert_eq!(lab.counter("drop_src_martian"), 6);
        assert_eq!(lab.counter("drop_src_vip"), 2);
        assert_eq!(lab.counter("drop_src_backend"), 2);
        assert_eq!(lab.counter("drop_src_local"), 1);
        assert_eq!(lab.count_half_open(), 0, "no state");
        assert_eq!(lab.count_sessions(SessionTable::Pending), 0, "no state");
        assert_eq!(lab.listener_counters("web").new_conns, 0);
    });
}

#[test]
fn ttl_expiring_packets_to_a_vip_are_dropped_not_forwarded() {
    with_lab(|lab| {
        lab.apply(vec![web(0)]);
        let mut one = FrameSpec::tcp(client(47000), sa(VIP), SYN);
        one.ttl = 1;
        let mut zero = one.clone();
        zero.ttl = 0;
        let mut two = FrameSpec::tcp(client(47001), sa(VIP), SYN);
        two.ttl = 2;
        lab.check(&[
            Fixture::unchanged(
                "TTL 1 to a VIP: dropped (no time-exceeded naming a backend)",
                one.build(),
                XDP_DROP,
            ),
            Fixture::unchanged("TTL 0 to a VIP: dropped", zero.build(), XDP_DROP),
            Fixture::rewritten(
                "TTL 2: forwarded with TTL 1",
                two.build(),
                XDP_REDIRECT,
                to_backend(lab, &two, 2, 8080),
            ),
        ]);
        assert_eq!(lab.counter("drop_ttl"), 2);
        assert_eq!(lab.count_half_open(), 1, "only the TTL-2 SYN made state");
    });
}

#[test]
fn udp_flows_are_verified_by_a_two_way_exchange() {
    with_lab(|lab| {
        let mut d = dns();
        lab.apply(vec![d.clone()]);
        let a = FrameSpec::udp(client(5000), sa(UDP_VIP), b"query-a");
        let (v, out) = lab.run(&a.build());
        assert_eq!(v, XDP_REDIRECT);
        let n = backend_of(&out);
        let key = conn_key(lab, "dns", client(5000), PROTO_UDP);
        assert_eq!(lab.half_open(&key).unwrap().kind, HALF_UDP);
        lab.check(&[Fixture::rewritten(
            "UDP: same socket, same backend (unverified)",
            a.build(),
            XDP_REDIRECT,
            to_backend(lab, &a, n, 5353),
        )]);
        assert!(
            lab.conn(&key).is_none(),
            "client packets alone verify nothing"
        );
        let mut answer = FrameSpec::udp(backend(n, 5353), client(5000), b"answer");
        answer.src_mac = backend_mac(n);
        answer.dst_mac = lab.backend_if_mac;
        assert_eq!(lab.run_on(lab.backend_if, &answer.build()).0, XDP_REDIRECT);
        lab.check(&[Fixture::rewritten(
            "UDP: a client packet after the backend answered: verified",
            a.build(),
            XDP_REDIRECT,
            to_backend(lab, &a, n, 5353),
        )]);
        assert_eq!(lab.conn(&key).unwrap().state, CONN_OPEN);
        let b = FrameSpec::udp(client(5001), sa(UDP_VIP), b"query-b");
        let (_, out) = lab.run(&b.build());
        assert_ne!(
            backend_of(&out),
            n,
            "persistence off: next socket, next backend"
        );
        let mut none = FrameSpec::udp(client(5002), sa(UDP_VIP), b"no checksum");
        none.udp_no_checksum = true;
        let (_, out) = lab.run(&none.build());
        assert_eq!(&out[40..42], &[0, 0], "a UDP checksum of 0 stays 0");

        d.persist = 60;
        lab.apply(vec![d]);
        let (_, out) = lab.run(&FrameSpec::udp(client(6000), sa(UDP_VIP), b"q").build());
        let p = backend_of(&out);
        for port in 6001..6005 {
            let s = FrameSpec::udp(client(port), sa(UDP_VIP), b"q");
            lab.check(&[Fixture::rewritten(
                "UDP persistence: same backend for new sockets",
                s.build(),
                XDP_REDIRECT,
                to_backend(lab, &s, p, 5353),
            )]);
        }
    });
}

/// A backend's 4 000-byte UDP answer, fragmented by its stack (1 480-byte pieces), reaches
/// the client from the VIP: every fragment (the later ones carry no ports), reassembling into
/// the datagram the client asked the VIP for. Fragments of no noted datagram pass untouched;
/// a client's fragments to a VIP are dropped.
#[test]
fn a_fragmented_udp_reply_reaches_the_client_from_the_vip() {
    with_lab(|lab| {
        lab.apply(vec![dns()]);
        let q = FrameSpec::udp(client(5300), sa(UDP_VIP), b"large query");
        let (v, out) = lab.run(&q.build());
        assert_eq!(v, XDP_REDIRECT);
        let n = backend_of(&out);
        let body: Vec<u8> = (0..4000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut answer = FrameSpec::udp(backend(n, 5353), client(5300), &body);
        answer.frag = 0;
        answer.src_mac = backend_mac(n);
        answer.dst_mac = lab.backend_if_mac;
        let pieces = packet::fragments(&answer.build(), 1480);
        assert_eq!(pieces.len(), 3);
        let (first, rewritten) = (
            lab.counter("reply_frag_first"),
            lab.counter("reply_frag_rewritten"),
        );
        let mut outs = Vec::new();
        for (i, f) in pieces.iter().enumerate() {
            let (v, out) = lab.run_on(lab.backend_if, f);
            assert_eq!(v, XDP_REDIRECT, "fragment {i}");
            assert_eq!(
                &out[14 + 12..14 + 16],
                &[10, 0, 0, 100],
                "fragment {i} from the VIP"
            );
            assert_eq!(&out[0..6], &CLIENT_MAC, "fragment {i} to the client");
            outs.push(out);
        }
        assert_eq!(lab.counter("reply_frag_first"), first + 1);
        assert_eq!(lab.counter("reply_frag_rewritten"), rewritten + 2);
        let mut expected = answer.clone();
        expected.src = sa(UDP_VIP);
        expected.ttl -= 1;
        expected.src_mac = lab.client_if_mac;
        expected.dst_mac = CLIENT_MAC;
        let whole = packet::reassemble(&outs).expect("one datagram");
        packet::verify_checksums(&whole).expect("checksums of the whole datagram");
        assert_eq!(whole, expected.build(), "the datagram as from the VIP");

        // A later fragment of a datagram clb noted nothing for (another identification, or
        // not a reply at all): the stack's.
        let mut other = pieces[1].clone();
        other[14 + 4] ^= 0xff;
        let c = packet::checksum(&{
            let mut h = other[14..34].to_vec();
            h[10..12].copy_from_slice(&[0, 0]);
            h
        });
        other[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
        let not_noted = lab.counter("frag_not_noted");
        lab.check(&[
            Fixture::unchanged("a later fragment of no noted datagram", other, XDP_PASS)
                .on(lab.backend_if),
        ]);
        assert_eq!(lab.counter("frag_not_noted"), not_noted + 1);

        // A client's fragmented datagram to a VIP: no ports in the later pieces, dropped
        // (first and later alike), and no state.
        let mut big = FrameSpec::udp(client(5301), sa(UDP_VIP), &body);
        big.frag = 0;
        let cpieces = packet::fragments(&big.build(), 1480);
        let drops = lab.counter("drop_fragment");
        for f in &cpieces {
            assert_eq!(lab.run(f).0, XDP_DROP);
        }
        assert_eq!(lab.counter("drop_fragment"), drops + 3);
        assert!(
            lab.half_open(&conn_key(lab, "dns", client(5301), PROTO_UDP))
                .is_none()
        );
    });
}

#[test]
fn a_flood_of_new_sources_evicts_no_verified_state() {
    // The smallest tables: 1024 half-open entries.
    let tables = TablesSpec {
        half_open: 1024,
        connections: 65536,
        sessions: 65536,
        ..TablesSpec::default()
    };
    with_lab_tables(tables, |lab| {
        lab.apply(vec![web(600)]);
        let real: Vec<(SocketAddrV4, u8)> = (0..20u16)
            .map(|i| {
                let c = SocketAddrV4::new([10, 2, 0, 1 + i as u8].into(), 30000 + i);
                (c, handshake(lab, c))
            })
            .collect();
        // 20 000 SYNs from distinct spoofed sources: 20× the half-open table.
        for i in 0..20_000u32 {
            let src = Ipv4Addr::from(0x6440_0000 + i); // 100.64.0.0/10
            let (v, _) = lab.run(
                &FrameSpec::tcp(
                    SocketAddrV4::new(src, 1024 + (i % 60000) as u16),
                    sa(VIP),
                    SYN,
                )
                .build(),
            );
            assert_eq!(v, XDP_REDIRECT);
        }
        assert!(lab.counter("flood_entered") >= 1, "the flood was noticed");
        for (c, n) in &real {
            let key = conn_key(lab, "web", *c, PROTO_TCP);
            assert!(lab.conn(&key).is_some(), "connection of {c} survived");
            let skey = session_key(lab, "web", *c.ip());
            assert!(
                lab.session(SessionTable::Verified, &skey).is_some(),
                "persisted {c} survived"
            );
            let data = data_of(*c);
            lab.check(&[Fixture::rewritten(
                "a real connection after the flood: same backend",
                data.build(),
                XDP_REDIRECT,
                to_backend(lab, &data, *n, 8080),
            )]);
        }
        assert_eq!(lab.count_conns(), 20);
        assert_eq!(lab.count_sessions(SessionTable::Verified), 20);
    });
}

#[test]
fn a_full_half_open_set_gives_up_its_oldest_entry_and_turns_flood_mode_on() {
    // 1024 slots: 128 sets of 8. Flood mode by rate is off: only the set's overflow turns it on.
    let tables = TablesSpec {
        half_open: 1024,
        flood_threshold: Some(0),
        ..TablesSpec::default()
    };
    with_lab_tables(tables, |lab| {
        lab.apply(vec![web(0)]);
        // Nine handshakes of one client whose keys share a set, found as the datapath places
        // them (`clb_common::slots`, the code both sides run).
        let set = |c: SocketAddrV4| HalfSlot::hash(&conn_key(lab, "web", c, PROTO_TCP)) % 128;
        assert_eq!(slot_sets(1024), 128);
        let target = set(client(20000));
        let ports: Vec<SocketAddrV4> = (20000..60000u16)
            .map(client)
            .filter(|c| set(*c) == target)
            .take(SLOT_WAYS as usize + 1)
            .collect();
        assert_eq!(ports.len(), 9);
        for c in &ports[..8] {
            let (v, _) = lab.run(&FrameSpec::tcp(*c, sa(VIP), SYN).build());
            assert_eq!(v, XDP_REDIRECT);
            // Distinct timestamps: the first is the oldest.
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(lab.count_half_open(), 8);
        assert_eq!(lab.counter("half_open_evicted"), 0);
        assert_eq!(lab.counter("flood_entered"), 0, "no churn yet");
        // The ninth takes the oldest way: counted, and flood mode goes on.
        let (v, _) = lab.run(&FrameSpec::tcp(ports[8], sa(VIP), SYN).build());
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(lab.counter("half_open_evicted"), 1);
        assert_eq!(lab.counter("flood_entered"), 1);
        assert_eq!(lab.count_half_open(), 8);
        let key = |c: SocketAddrV4| conn_key(lab, "web", c, PROTO_TCP);
        assert!(lab.half_open(&key(ports[0])).is_none(), "the oldest went");
        for c in &ports[1..] {
            assert!(lab.half_open(&key(*c)).is_some(), "{c} kept its entry");
        }
        // The others' handshakes complete on their entries, as before.
        let n = half_backend_n(lab, &lab.half_open(&key(ports[1])).unwrap());
        syn_ack(lab, n, ports[1]);
        let (v, _) = lab.run(&FrameSpec::tcp(ports[1], sa(VIP), ACK).build());
        assert_eq!(v, XDP_REDIRECT);
        assert!(lab.conn(&key(ports[1])).is_some(), "promoted");
        assert_eq!(lab.counter("half_open_promote"), 1);
    });
}

#[test]
fn in_flood_mode_syns_write_nothing_and_their_handshakes_still_complete() {
    let tables = TablesSpec {
        flood_threshold: Some(1),
        ..TablesSpec::default()
    };
    with_lab_tables(tables, |lab| {
        lab.apply(vec![web(0)]);
        // Threshold 1 per CPU per window: the second new flow turns flood mode on.
        for p in 0..3u16 {
            lab.run(
                &FrameSpec::tcp(
                    SocketAddrV4::new([10, 2, 3, 3].into(), 100 + p),
                    sa(VIP),
                    SYN,
                )
                .build(),
            );
        }
        assert_eq!(lab.counter("flood_entered"), 1);
        let half_before = lab.count_half_open();
        let c = client(48000);
        let syn = FrameSpec::tcp(c, sa(VIP), SYN);
        let (v, out) = lab.run(&syn.build());
        assert_eq!(v, XDP_REDIRECT);
        let n = backend_of(&out);
        assert_eq!(
            lab.count_half_open(),
            half_before,
            "a SYN in flood mode writes nothing"
        );
        assert!(lab.counter("flood_hashed") >= 1);
        // Its ACK finds no state: the stateless hash names the same backend.
        for _ in 0..3 {
            let ack = FrameSpec::tcp(c, sa(VIP), ACK);
            lab.check(&[Fixture::rewritten(
                "handshake ACK in flood mode: same backend as its SYN",
                ack.build(),
                XDP_REDIRECT,
                to_backend(lab, &ack, n, 8080),
            )]);
        }
        let key = conn_key(lab, "web", c, PROTO_TCP);
        assert!(lab.conn(&key).is_none());
        // The backend's normal answer verifies the flow.
        let answer = reply_from(lab, n, 8080, c, ACK | PSH).payload(b"hi");
        assert_eq!(lab.run_on(lab.backend_if, &answer.build()).0, XDP_REDIRECT);
        assert_eq!(lab.conn(&key).unwrap().state, CONN_OPEN);
    });
}

#[test]
fn listeners_sharing_a_backend_keep_their_replies_apart_in_flood_mode() {
    let tables = TablesSpec {
        flood_threshold: Some(1),
        ..TablesSpec::default()
    };
    with_lab_tables(tables, |lab| {
        let mut other = web(0);
        other.name = "web81".into();
        other.vip = sa("10.0.0.100:81").into();
        lab.apply(vec![web(0), other]);
        for p in 0..3u16 {
            lab.run(
                &FrameSpec::tcp(
                    SocketAddrV4::new([10, 2, 3, 3].into(), 100 + p),
                    sa(VIP),
                    SYN,
                )
                .build(),
            );
        }
        assert_eq!(lab.counter("flood_entered"), 1);
        // A SYN to :81 in flood mode; its backend also serves :80.
        let c = client(48100);
        let (v, out) = lab.run(&FrameSpec::tcp(c, sa("10.0.0.100:81"), SYN).build());
        assert_eq!(v, XDP_REDIRECT);
        let n = backend_of(&out);
        let key = conn_key(lab, "web81", c, PROTO_TCP);
        assert!(
            lab.half_open(&key).is_some(),
            "a shared backend: the SYN keeps its state"
        );
        let synack = reply_from(lab, n, 8080, c, SYN | ACK);
        let mut expected = synack.clone();
        expected.src = sa("10.0.0.100:81");
        expected.ttl -= 1;
        expected.src_mac = lab.client_if_mac;
        expected.dst_mac = CLIENT_MAC;
        let backend_if = lab.backend_if;
        lab.check(&[Fixture::rewritten(
            "SYN-ACK of a flow on :81 goes back from :81, not :80",
            synack.build(),
            XDP_REDIRECT,
            expected.build(),
        )
        .on(backend_if)]);
    });
}

#[test]
fn icmp_fragmentation_needed_about_a_flow_reaches_its_backend() {
    with_lab(|lab| {
        lab.apply(vec![web(0)]);
        let c = client(49000);
        let n = handshake(lab, c);
        // The backend's reply as clb sent it on (SNATed, TTL-1), quoted by a router that
        // cannot forward it: "fragmentation needed, MTU 1400", to the VIP.
        let mut sent = FrameSpec::tcp(sa(VIP), c, ACK | PSH).payload(&[7u8; 64]);
        sent.ttl = 63;
        let router = Ipv4Addr::new(10, 2, 0, 254);
        let input = icmp_error(
            router,
            *sa(VIP).ip(),
            3,
            4,
            1400,
            &sent.build(),
            20 + 20 + 64,
        );
        // What the backend must get: the quote of its own packet, to its own address.
        let mut own = sent.clone();
        own.src = backend(n, 8080);
        let mut expected = icmp_error(
            router,
            *backend(n, 8080).ip(),
            3,
            4,
            1400,
            &own.build(),
            20 + 20 + 64,
        );
        expected[0..6].copy_from_slice(&backend_mac(n));
        expected[6..12].copy_from_slice(&lab.backend_if_mac);
        expected[22] -= 1; // TTL
        let ck = clb_tests::packet::checksum(&{
            let mut h = expected[14..34].to_vec();
            h[10] = 0;
            h[11] = 0;
            h
        });
        expected[24..26].copy_from_slice(&ck.to_be_bytes());
        lab.check(&[Fixture::rewritten(
            "ICMP frag-needed about a flow: NATed (outer and quoted headers) to its backend",
            input,
            XDP_REDIRECT,
            expected,
        )]);
        assert_eq!(lab.counter("icmp_nated"), 1);
        // About a flow clb does not track: passed to the stack untouched.
        let mut other = sent.clone();
        other.dst = client(49999);
        let stray = icmp_error(router, *sa(VIP).ip(), 3, 4, 1400, &other.build(), 28);
        lab.check(&[Fixture::unchanged(
            "ICMP about an unknown flow passes",
            stray,
            XDP_PASS,
        )]);
    });
}

#[test]
fn dsr_rewrites_only_the_macs_and_its_flows_verify_on_the_client_side() {
    with_lab(|lab| {
        let mut l = ListenerSpec::new("dsr", sa(VIP), Proto::Tcp);
        l4(&mut l).forward = Forward::Dsr;
        l.backends = (2..=3)
            .map(|n| BackendSpec::new(backend(n, 80), 10))
            .collect();
        lab.apply(vec![l]);
        let c = client(50000);
        let syn = FrameSpec::tcp(c, sa(VIP), SYN);
        let (v, out) = lab.run(&syn.build());
        assert_eq!(v, XDP_REDIRECT);
        let n = dsr_backend_of(&out);
        assert_eq!(
            out,
            dsr_to(lab, &syn, n),
            "only MACs and TTL change; the VIP stays"
        );
        let ack = FrameSpec::tcp(c, sa(VIP), ACK);
        let data = data_of(c);
        lab.check(&[
            Fixture::rewritten(
                "DSR: handshake ACK",
                ack.build(),
                XDP_REDIRECT,
                dsr_to(lab, &ack, n),
            ),
            Fixture::rewritten(
                "DSR: data",
                data.build(),
                XDP_REDIRECT,
                dsr_to(lab, &data, n),
            ),
        ]);
        let key = conn_key(lab, "dsr", c, PROTO_TCP);
        assert_eq!(lab.conn(&key).unwrap().state, CONN_OPEN);
        // A client FIN closes it (no replies are ever seen).
        let fin = FrameSpec::tcp(c, sa(VIP), FIN | ACK);
        assert_eq!(lab.run(&fin.build()).0, XDP_REDIRECT);
        assert_eq!(lab.conn(&key).unwrap().state, CONN_FIN);
        assert_eq!(lab.listener_counters("dsr").rev_packets, 0);
        assert!(lab.counter("dsr_forwarded") >= 4);
    });
}

#[test]
fn maglev_picks_the_backend_user_space_predicts_and_adopts_unknown_flows() {
    with_lab(|lab| {
        let mut l = web(600);
        l4(&mut l).sched = Sched::Maglev;
        l4(&mut l).persist_mask = Some(24);
        lab.apply(vec![l]);
        let members: Vec<Member> = (2..=4u8)
            .map(|n| Member {
                id: lab.backend_id("web", backend(n, 8080)),
                addr: backend(n, 8080).into(),
                weight: 10,
            })
            .collect();
        let table = maglev::table(&members, clb_common::DEFAULT_MAGLEV_SIZE);
        let predict = |ip: Ipv4Addr| -> u8 {
            let h = client_hash(
                ip_to_be(ip.octets()) & prefix_mask_be(24),
                ip_to_be([10, 0, 0, 100]),
                port_to_be(80),
                PROTO_TCP,
            );
            let id = table[(h as usize) % table.len()];
            match members.iter().find(|m| m.id == id).unwrap().addr {
                std::net::SocketAddr::V4(a) => a.ip().octets()[3],
                std::net::SocketAddr::V6(_) => unreachable!("IPv4 members"),
            }
        };
        let mut seen = std::collections::HashSet::new();
        for i in 0..30u8 {
            let ip = Ipv4Addr::new(10, 2, i, 1);
            let (v, out) =
                lab.run(&FrameSpec::tcp(SocketAddrV4::new(ip, 40000), sa(VIP), SYN).build());
            assert_eq!(v, XDP_REDIRECT);
            assert_eq!(backend_of(&out), predict(ip), "client {ip}");
            seen.insert(backend_of(&out));
            // Another address of the same /24 shares the choice (--persist-mask 24).
            let same = Ipv4Addr::new(10, 2, i, 200);
            let (_, out2) =
                lab.run(&FrameSpec::tcp(SocketAddrV4::new(same, 40001), sa(VIP), SYN).build());
            assert_eq!(backend_of(&out2), backend_of(&out), "prefix of {ip}");
        }
        assert_eq!(seen.len(), 3, "all backends used");
        // A mid-stream packet of a flow this node never saw goes where the hash says (another
        // node began it), not a RST.
        let ip = Ipv4Addr::new(10, 2, 77, 9);
        let mid = FrameSpec::tcp(SocketAddrV4::new(ip, 41000), sa(VIP), ACK).payload(b"x");
        let n = predict(ip);
        lab.check(&[Fixture::rewritten(
            "maglev: unknown mid-stream flow goes to the hashed backend",
            mid.build(),
            XDP_REDIRECT,
            to_backend(lab, &mid, n, 8080),
        )]);
    });
}

#[test]
fn foreign_traffic_passes_untouched() {
    with_lab(|lab| {
        lab.apply(vec![web(0)]);
        let mut icmp = FrameSpec::tcp(client(1), sa(VIP), 0);
        icmp.proto = 1;
        icmp.payload = vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0];
        let mut arp = FrameSpec::tcp(client(1), sa(VIP), SYN).build();
        arp[12] = 0x08;
        arp[13] = 0x06;
        lab.check(&[
            Fixture::unchanged(
                "non-VIP TCP passes",
                FrameSpec::tcp(client(1), sa("10.0.0.101:80"), SYN).build(),
                XDP_PASS,
            ),
            Fixture::unchanged(
                "VIP port without a listener passes",
                FrameSpec::tcp(client(1), sa("10.0.0.100:81"), SYN).build(),
                XDP_PASS,
            ),
            Fixture::unchanged(
                "UDP to the TCP listener's port passes",
                FrameSpec::udp(client(1), sa(VIP), b"x").build(),
                XDP_PASS,
            ),
            Fixture::unchanged("ICMP echo to the VIP passes", icmp.build(), XDP_PASS),
            Fixture::unchanged("ARP passes", arp, XDP_PASS),
            Fixture::unchanged(
                "IPv4 frame too short for an IPv4 header passes",
                {
                    let mut f = FrameSpec::tcp(client(1), sa(VIP), SYN).build();
                    f.truncate(14 + 10);
                    f
                },
                XDP_PASS,
            ),
        ]);
        assert_eq!(lab.listener_counters("web").fwd_packets, 0);
    });
}

#[test]
fn malformed_vip_packets_are_dropped_with_a_reason_and_ip_options_are_forwarded() {
    with_lab(|lab| {
        lab.apply(vec![web(0)]);
        let syn = FrameSpec::tcp(client(46000), sa(VIP), SYN);
        let mut frag = syn.clone();
        frag.frag = 0x2000; // more fragments
        let mut frag2 = syn.clone();
        frag2.frag = 0x0010; // offset 128
        let mut bad_ihl = syn.build();
        bad_ihl[14] = 0x44;
        let mut cut_l4 = syn.build();
        cut_l4.truncate(14 + 20 + 10);
        cut_l4[16..18].copy_from_slice(&30u16.to_be_bytes());
        let mut long_total = syn.build();
        long_total[16..18].copy_from_slice(&1400u16.to_be_bytes());
        let mut bad_doff = syn.build();
        bad_doff[14 + 20 + 12] = 0x40; // data offset 16 bytes < 20
        let mut v6 = syn.build();
        v6[14] = 0x65;
        lab.check(&[
            Fixture::unchanged("fragment (MF) to a VIP", frag.build(), XDP_DROP),
            Fixture::unchanged("fragment (offset) to a VIP", frag2.build(), XDP_DROP),
            Fixture::unchanged("IHL 4", bad_ihl, XDP_DROP),
            Fixture::unchanged("TCP header cut off", cut_l4, XDP_DROP),
            Fixture::unchanged("total length beyond the frame", long_total, XDP_DROP),
            Fixture::unchanged("TCP data offset below 20", bad_doff, XDP_DROP),
            Fixture::unchanged("version 6 in an IPv4 frame", v6, XDP_DROP),
        ]);
        assert_eq!(lab.counter("drop_fragment"), 2);
        assert_eq!(lab.counter("drop_bad_ihl"), 1);
        assert_eq!(lab.counter("drop_truncated_l4"), 2);
        assert_eq!(lab.counter("drop_truncated_ip"), 1);
        assert_eq!(lab.counter("drop_bad_version"), 1);
        assert_eq!(lab.counter("verdict_drop"), 7);
        assert_eq!(
            lab.listener_counters("web").new_conns,
            0,
            "nothing scheduled"
        );

        let mut opts = syn.clone();
        opts.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL: IHL 6
        let (v, out) = lab.run(&opts.build());
        assert_eq!(v, XDP_REDIRECT, "IHL > 5 is forwarded");
        let n = backend_of(&out);
        lab.check(&[Fixture::rewritten(
            "IPv4 options: forwarded (same flow)",
            opts.build(),
            XDP_REDIRECT,
            to_backend(lab, &opts, n, 8080),
        )]);
    });
}

/// "web" with weighted least connections and no persistence.
fn web_lc() -> ListenerSpec {
    let mut l = web(0);
    l4(&mut l).sched = Sched::Lc;
    l4(&mut l).idle_timeout = Some(20);
    l
}

#[test]
fn least_connections_counts_every_way_a_connection_opens_and_ends() {
    with_lab(|lab| {
        lab.apply(vec![web_lc()]);
        let active = |n: u8| lab.active("web", backend(n, 8080));
        // Three connections on three backends: each goes to a least-loaded one.
        let (c1, c2, c3) = (client(45001), client(45002), client(45003));
        let n1 = handshake(lab, c1);
        assert_eq!(active(n1), 1, "the handshake's ACK opened it");
        let n2 = handshake(lab, c2);
        let n3 = handshake(lab, c3);
        let mut ns = [n1, n2, n3];
        ns.sort_unstable();
        assert_eq!(ns, [2, 3, 4], "one connection on each backend");
        // A SYN alone (no proof yet) counts nothing.
        let (v, out) = lab.run(&FrameSpec::tcp(client(45009), sa(VIP), SYN).build());
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(
            active(backend_of(&out)),
            1,
            "an unverified SYN is not active"
        );

        // The client's FIN ends c1 on n1: the next connection is n1's, the only emptier one.
        let fin = FrameSpec::tcp(c1, sa(VIP), FIN | ACK);
        assert_eq!(lab.run(&fin.build()).0, XDP_REDIRECT);
        assert_eq!(active(n1), 0, "FIN from the client");
        let c4 = client(45004);
        assert_eq!(
            handshake(lab, c4),
            n1,
            "least connections: the backend with none"
        );
        // The backend's FIN ends c4 (seen on the reply path).
        let bfin = reply_from(lab, n1, 8080, c4, FIN | ACK);
        assert_eq!(lab.run_on(lab.backend_if, &bfin.build()).0, XDP_REDIRECT);
        assert_eq!(active(n1), 0, "FIN from the backend");
        // A second FIN of a closed connection counts nothing again.
        assert_eq!(lab.run(&fin.build()).0, XDP_REDIRECT);
        assert_eq!(active(n1), 0);

        // An RST from the backend ends c2; both ends talking again brings it back.
        let brst = reply_from(lab, n2, 8080, c2, RST);
        assert_eq!(lab.run_on(lab.backend_if, &brst.build()).0, XDP_REDIRECT);
        assert_eq!(active(n2), 0, "RST");
        assert_eq!(lab.run(&data_of(c2).build()).0, XDP_REDIRECT);
        assert_eq!(
            active(n2),
            0,
            "the client alone proves nothing after an RST"
        );
        let r2 = reply_from(lab, n2, 8080, c2, ACK);
        assert_eq!(lab.run_on(lab.backend_if, &r2.build()).0, XDP_REDIRECT);
        assert_eq!(active(n2), 1, "both ends again: open again");

        // Idle expiry: the sweeper deletes c3's entry and takes it off n3's count.
        let k3 = conn_key(lab, "web", c3, PROTO_TCP);
        backdate_conn(lab, &k3, 25);
        let r = lab.sweep();
        assert!(r.conns_removed >= 1);
        assert_eq!(active(n3), 0, "idle expiry, by the sweeper");

        // An entry that vanished without a packet (LRU eviction: deleted behind clb's back)
        // is corrected by the next walk; so is a count that drifted upwards.
        let k2 = conn_key(lab, "web", c2, PROTO_TCP);
        lab.delete_conn(&k2);
        assert_eq!(active(n2), 1, "the datapath did not see it go");
        lab.sweep();
        assert_eq!(active(n2), 0, "the walk found no open entry on it");

        // A removed backend's open connections leave its count with the purge.
        let c5 = client(45005);
        let n5 = handshake(lab, c5);
        assert_eq!(active(n5), 1);
        let mut l = web_lc();
        l.backends.retain(|b| b.addr != backend(n5, 8080).into());
        let id5 = lab.backend_id("web", backend(n5, 8080));
        lab.apply(vec![l]);
        assert_eq!(
            clb::datapath::Tables::actives(lab.reader())[id5 as usize],
            0,
            "purged with its backend"
        );
    });
}

#[test]
fn least_connections_divides_by_weight_and_a_persisted_client_stays() {
    with_lab(|lab| {
        let mut l = web_lc();
        l.persist = 600;
        // Weights 1 : 2 : 0 (the third takes nothing new).
        for (b, w) in l.backends.iter_mut().zip([1, 2, 0]) {
            b.weight = w;
        }
        lab.apply(vec![l]);
        let mut on = [0u32; 5];
        for i in 0..30 {
            // Each from its own address: no persistence entry to follow.
            let c = SocketAddrV4::new(Ipv4Addr::new(10, 2, 0, 1 + i), 46000);
            on[usize::from(handshake(lab, c))] += 1;
        }
        assert!(
            (9..=11).contains(&on[2]) && on[2] + on[3] == 30 && on[4] == 0,
            "active / weight equalised at 1 : 2: {on:?}"
        );
        // A persisted client keeps its backend however many more connections it opens,
        // although the other one becomes the less loaded.
        let first = SocketAddrV4::new(Ipv4Addr::new(10, 2, 0, 1), 46001);
        let b = handshake(lab, first);
        for port in 46002..46010 {
            let c = SocketAddrV4::new(Ipv4Addr::new(10, 2, 0, 1), port);
            assert_eq!(
                handshake(lab, c),
                b,
                "its persistence entry, not the least loaded"
            );
        }
        assert_eq!(
            lab.active("web", backend(b, 8080)),
            i64::from(on[usize::from(b)]) + 9
        );
    });
}

#[test]
fn least_connection_counts_do_not_drift_over_100k_connections_with_evictions() {
    // 1024 connection entries: the LRU evicts almost every connection left open.
    let tables = TablesSpec {
        connections: 1024,
        flood_threshold: Some(0),
        ..TablesSpec::default()
    };
    with_lab_tables(tables, |lab| {
        lab.apply(vec![web_lc()]);
        let ids: Vec<u32> = (2..=4)
            .map(|n| lab.backend_id("web", backend(n, 8080)))
            .collect();
        let open_entries = || {
            let mut by: std::collections::HashMap<u32, i64> = Default::default();
            clb::datapath::Tables::scan_conns(lab.reader(), &mut |_, vs| {
                for v in vs.iter().filter(|v| v.state == CONN_OPEN) {
                    *by.entry(v.backend).or_default() += 1;
                }
                true
            })
            .unwrap();
            by
        };
        for i in 0..100_000u32 {
            let c = SocketAddrV4::new(
                Ipv4Addr::new(10, 2, 0, 1 + (i / 50_000) as u8),
                1024 + (i % 50_000) as u16,
            );
            let n = handshake(lab, c);
            let end = match i % 4 {
                0 => Some((lab.client_if, FrameSpec::tcp(c, sa(VIP), FIN | ACK))),
                1 => Some((lab.backend_if, reply_from(lab, n, 8080, c, RST))),
                2 => Some((lab.client_if, FrameSpec::tcp(c, sa(VIP), RST))),
                // Left open: evicted by the LRU, or aged out below.
                _ => None,
            };
            if let Some((on, f)) = end {
                assert_eq!(lab.run_on(on, &f.build()).0, XDP_REDIRECT);
            }
        }
        let actives = |lab: &PacketLab| {
            let a = clb::datapath::Tables::actives(lab.reader());
            ids.iter().map(|id| a[*id as usize]).collect::<Vec<i64>>()
        };
        let truth = open_entries();
        let before: i64 = actives(lab).iter().sum();
        let open: i64 = truth.values().sum();
        assert!(
            before > open + 20_000,
            "the evicted open connections are still counted before a walk: {before} vs {open}"
        );
        // Half the surviving open entries go idle past the timeout.
        let mut aged = 0;
        clb::datapath::Tables::scan_conns(lab.reader(), &mut |ks, vs| {
            for (k, v) in ks.iter().zip(vs) {
                if v.state == CONN_OPEN && aged < open / 2 {
                    lab.put_conn(
                        *k,
                        ConnValue {
                            last_seen_ns: ago(25),
                            ..*v
                        },
                    );
                    aged += 1;
                }
            }
            true
        })
        .unwrap();
        let r = lab.sweep();
        assert!(r.conns_removed >= aged as u64);
        let truth = open_entries();
        let want: Vec<i64> = ids
            .iter()
            .map(|id| truth.get(id).copied().unwrap_or(0))
            .collect();
        assert_eq!(
            actives(lab),
            want,
            "each count is its backend's open entries"
        );
        assert!(want.iter().sum::<i64>() > 0, "some open entries survive");
    });
}

#[test]
fn on_dsr_least_connections_counts_what_the_client_side_shows() {
    with_lab(|lab| {
        let mut l = ListenerSpec::new("dsr", sa(VIP), Proto::Tcp);
        l4(&mut l).forward = Forward::Dsr;
        l4(&mut l).sched = Sched::Lc;
        l.backends = (2..=3)
            .map(|n| BackendSpec::new(backend(n, 80), 10))
            .collect();
        lab.apply(vec![l]);
        let active = |n: u8| lab.active("dsr", backend(n, 80));
        // Verified by the client's data after its handshake ACK (clb never sees the SYN-ACK).
        let open = |c: SocketAddrV4| {
            let (v, out) = lab.run(&FrameSpec::tcp(c, sa(VIP), SYN).build());
            assert_eq!(v, XDP_REDIRECT);
            let n = dsr_backend_of(&out);
            assert_eq!(
                lab.run(&FrameSpec::tcp(c, sa(VIP), ACK).build()).0,
                XDP_REDIRECT
            );
            assert_eq!(active(n), 0, "a SYN and an ACK prove nothing on DSR");
            assert_eq!(lab.run(&data_of(c).build()).0, XDP_REDIRECT);
            n
        };
        let (c1, c2) = (client(50100), client(50101));
        let n1 = open(c1);
        assert_eq!(active(n1), 1);
        let n2 = open(c2);
        assert_ne!(n1, n2, "the second connection goes to the empty backend");
        // The client's FIN closes the count; so does its RST.
        assert_eq!(
            lab.run(&FrameSpec::tcp(c1, sa(VIP), FIN | ACK).build()).0,
            XDP_REDIRECT
        );
        assert_eq!(active(n1), 0);
        assert_eq!(
            lab.run(&FrameSpec::tcp(c2, sa(VIP), RST).build()).0,
            XDP_REDIRECT
        );
        assert_eq!(active(n2), 0);
        // After an RST the client alone brings a DSR flow back (its replies are never seen).
        assert_eq!(lab.run(&data_of(c2).build()).0, XDP_REDIRECT);
        assert_eq!(
            active(n2),
            1,
            "the client talks on after the RST: open again"
        );
    });
}
