//! Packet-level tests of the IPv6 datapath through `BPF_PROG_TEST_RUN` (the balancer program
//! tail-calls its IPv6 programs, as on a NIC), provisioned through the daemon's own control
//! plane. Each row: input frame, expected verdict, expected output frame (checksums recomputed
//! from scratch and compared).

use std::{
    net::{Ipv6Addr, SocketAddrV6},
    time::Duration,
};

use clb::{
    control::model::{BackendSpec, Forward, Kind, ListenerSpec, Proto, Sched},
    datapath::SessionTable,
    sched::{Member, maglev},
};
use clb_common::{
    CONN_OPEN, ConnKey6, HALF_SYN, HALF_UDP, PROTO_TCP, PROTO_UDP, SessionKey6, client_hash6,
    ip6_to_be, mask6, port_to_be, prefix_mask6_be,
};
use clb_tests::{
    lab::{
        CLIENT6, Fixture, PacketLab, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, backend,
        backend_mac, backend6, with_lab,
    },
    packet::{ACK, CLIENT_MAC, FrameSpec, LB_MAC, PSH, RST, SYN},
    packet6::{
        DEST_OPTS, DEST_UNREACH, ECHO_REQUEST, FRAGMENT, Frame6Spec, HOP_BY_HOP, NEIGHBOR_ADVERT,
        NEIGHBOR_SOLICIT, PACKET_TOO_BIG, ROUTING, fragments6, icmp6_error, l4_checksum, parse6,
        reassemble6, verify_checksums6,
    },
};

const VIP: &str = "[fd00::100]:80";
const UDP_VIP: &str = "[fd00::100]:53";

fn sa(s: &str) -> SocketAddrV6 {
    s.parse().unwrap()
}

fn client(port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(CLIENT6, port, 0, 0)
}

/// A client behind the client-side router, in prefix `fd00:2:0:net::/64`.
fn remote(net: u16, host: u16, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(Ipv6Addr::new(0xfd00, 2, 0, net, 0, 0, 0, host), port, 0, 0)
}

fn l4(l: &mut ListenerSpec) -> &mut clb::control::model::L4Spec {
    match &mut l.kind {
        Kind::L4(k) => k,
        Kind::Http(_) => unreachable!("an L4 listener"),
    }
}

fn web(persist: u32) -> ListenerSpec {
    let mut l = ListenerSpec::new("web6", sa(VIP), Proto::Tcp);
    l.persist = persist;
    l.backends = (2..=4)
        .map(|n| BackendSpec::new(backend6(n, 8080), 10))
        .collect();
    l
}

fn dns() -> ListenerSpec {
    let mut l = ListenerSpec::new("dns6", sa(UDP_VIP), Proto::Udp);
    l.backends = (5..=6)
        .map(|n| BackendSpec::new(backend6(n, 5353), 10))
        .collect();
    l
}

/// `spec` as the balancer must forward it to backend `[fd00:10::n]:port` (NAT).
fn to_backend(lab: &PacketLab, spec: &Frame6Spec, n: u8, port: u16) -> Vec<u8> {
    let mut s = spec.clone();
    s.dst = backend6(n, port);
    s.hop_limit -= 1;
    s.src_mac = lab.backend_if_mac;
    s.dst_mac = backend_mac(n);
    s.build()
}

/// The backend whose address the forwarded frame carries.
fn backend_of(frame: &[u8]) -> u8 {
    parse6(frame).unwrap().dst.ip().octets()[15]
}

fn conn_key(lab: &PacketLab, listener: &str, c: SocketAddrV6, proto: u8) -> ConnKey6 {
    ConnKey6 {
        client: ip6_to_be(c.ip().octets()),
        client_port: port_to_be(c.port()),
        listener: lab.listener_id(listener),
        proto,
        _pad: [0; 3],
    }
}

fn session_key(lab: &PacketLab, listener: &str, c: Ipv6Addr, mask: u8) -> SessionKey6 {
    SessionKey6 {
        client: mask6(ip6_to_be(c.octets()), prefix_mask6_be(mask)),
        listener: lab.listener_id(listener),
        _pad: [0; 6],
    }
}

/// The reply of backend `n` (port) to `to`, as the backend sends it.
fn reply_from(lab: &PacketLab, n: u8, port: u16, to: SocketAddrV6, flags: u8) -> Frame6Spec {
    let mut r = Frame6Spec::tcp(backend6(n, port), to, flags);
    r.src_mac = backend_mac(n);
    r.dst_mac = lab.backend_if_mac;
    r
}

/// Backend `n` (port 8080) answers `c`'s SYN with a SYN-ACK whose sequence number the default
/// client ACK (2000) acknowledges; it must be NATed back to the client.
fn syn_ack(lab: &PacketLab, n: u8, c: SocketAddrV6) {
    let mut r = reply_from(lab, n, 8080, c, SYN | ACK);
    r.seq = 1999;
    r.ack = 1001;
    let (v, out) = lab.run_on(lab.backend_if, &r.build());
    assert_eq!(v, XDP_REDIRECT, "SYN-ACK NATed back to the client");
    assert_eq!(parse6(&out).unwrap().src, sa(VIP), "SYN-ACK from the VIP");
}

/// Opens a verified TCP connection of `c` (SYN, the backend's SYN-ACK, the ACK of it);
/// returns its backend.
fn handshake(lab: &PacketLab, c: SocketAddrV6) -> u8 {
    let (v, out) = lab.run(&Frame6Spec::tcp(c, sa(VIP), SYN).build());
    assert_eq!(v, XDP_REDIRECT, "SYN forwarded");
    let n = backend_of(&out);
    syn_ack(lab, n, c);
    let (v, out) = lab.run(&Frame6Spec::tcp(c, sa(VIP), ACK).build());
    assert_eq!(v, XDP_REDIRECT, "ACK forwarded");
    assert_eq!(backend_of(&out), n, "ACK on the SYN's backend");
    n
}

#[test]
fn an_ipv6_syn_is_natted_and_its_ack_promotes_it_extension_headers_kept() {
    with_lab(|lab| {
        // Both families configured: their flows keep to their own tables.
        let mut v4 = ListenerSpec::new(
            "web4",
            "10.0.0.100:80".parse::<std::net::SocketAddr>().unwrap(),
            Proto::Tcp,
        );
        v4.backends = vec![BackendSpec::new(backend(2, 8080), 10)];
        lab.apply(vec![web(0), v4]);
        let syns: Vec<Frame6Spec> = (0..3)
            .map(|i| Frame6Spec::tcp(client(40000 + i), sa(VIP), SYN))
            .collect();
        let order = [2u8, 3, 4];
        let rows: Vec<Fixture> = syns
            .iter()
            .zip(order)
            .map(|(s, n)| {
                Fixture::rewritten(
                    "IPv6 SYN: destination NAT to the next backend, hop limit - 1, next-hop MAC",
                    s.build(),
                    XDP_REDIRECT,
                    to_backend(lab, s, n, 8080),
                )
            })
            .collect();
        lab.check(&rows);
        let key = conn_key(lab, "web6", client(40000), PROTO_TCP);
        assert_eq!(lab.half_open6(&key).unwrap().kind, HALF_SYN);
        assert!(
            lab.conn6(&key).is_none(),
            "a SYN writes no connection entry"
        );
        let mut rows = Vec::new();
        for (i, n) in order.iter().enumerate() {
            syn_ack(lab, *n, client(40000 + i as u16));
            let ack = Frame6Spec::tcp(client(40000 + i as u16), sa(VIP), ACK);
            rows.push(Fixture::rewritten(
                "handshake ACK: promoted, same backend",
                ack.build(),
                XDP_REDIRECT,
                to_backend(lab, &ack, *n, 8080),
            ));
            // Hop-by-hop and destination options before TCP: walked, kept, the TCP checksum
            // (after them) updated.
            let data = Frame6Spec::tcp(client(40000 + i as u16), sa(VIP), ACK | PSH)
                .payload(b"GET / HTTP/1.1\r\n\r\n")
                .ext(HOP_BY_HOP, vec![1, 4, 0, 0, 0, 0])
                .ext(DEST_OPTS, vec![1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            rows.push(Fixture::rewritten(
                "established flow with extension headers: same backend, headers kept",
                data.build(),
                XDP_REDIRECT,
                to_backend(lab, &data, *n, 8080),
            ));
        }
        lab.check(&rows);
        assert_eq!(lab.conn6(&key).unwrap().state, CONN_OPEN);
        assert!(
            lab.half_open6(&key).is_none(),
            "promoted: left the half-open table"
        );
        assert_eq!(lab.counter("half_open_promote"), 3);
        assert_eq!(lab.count_conns(), 0, "no IPv4 entry for IPv6 flows");
        let c = lab.listener_counters("web6");
        assert_eq!((c.new_conns, c.fwd_packets), (3, 9));
        // The IPv4 listener beside it works on.
        let s4 = FrameSpec::tcp(
            "10.0.1.2:40000".parse().unwrap(),
            "10.0.0.100:80".parse().unwrap(),
            SYN,
        );
        assert_eq!(lab.run(&s4.build()).0, XDP_REDIRECT);
        assert_eq!(lab.listener_counters("web4").new_conns, 1);
    });
}

#[test]
fn ipv6_replies_are_source_natted_back_to_the_vip() {
    with_lab(|lab| {
        lab.apply(vec![web(0)]);
        let n = handshake(lab, client(41000));
        let reply = reply_from(lab, n, 8080, client(41000), ACK | PSH).payload(b"200 OK");
        let mut expected = reply.clone();
        expected.src = sa(VIP);
        expected.hop_limit -= 1;
        expected.src_mac = lab.client_if_mac;
        expected.dst_mac = CLIENT_MAC;
        let stray = {
            let mut r = reply.clone();
            r.dst = client(41001);
            r.build()
        };
        let bif = lab.backend_if;
        lab.check(&[
            Fixture::rewritten(
                "IPv6 reply: source NAT back to the VIP",
                reply.build(),
                XDP_REDIRECT,
                expected.build(),
            )
            .on(bif),
            Fixture::unchanged("backend packet without a flow passes", stray, XDP_PASS).on(bif),
        ]);
        assert_eq!(lab.counter("reply_no_conn"), 1);
    });
}

#[test]
fn ipv6_persistence_commits_on_the_handshake_keeps_a_prefix_together_and_expires() {
    with_lab(|lab| {
        lab.apply(vec![web(1)]);
        let mut backends = Vec::new();
        for port in 42000..42006 {
            let (v, out) = lab.run(&Frame6Spec::tcp(client(port), sa(VIP), SYN).build());
            assert_eq!(v, XDP_REDIRECT);
            backends.push(backend_of(&out));
            // Another client advances the round robin in between.
            let other = Frame6Spec::tcp(remote(9, port, port), sa(VIP), SYN);
            assert_eq!(lab.run(&other.build()).0, XDP_REDIRECT);
        }
        let n = backends[0];
        assert!(backends.iter().all(|b| *b == n), "{backends:?}");
        let skey = session_key(lab, "web6", CLIENT6, 128);
        assert!(lab.session6(SessionTable::Pending, &skey).is_some());
        assert!(lab.session6(SessionTable::Verified, &skey).is_none());
        syn_ack(lab, n, client(42000));
        let ack = Frame6Spec::tcp(client(42000), sa(VIP), ACK);
        lab.check(&[Fixture::rewritten(
            "handshake ACK",
            ack.build(),
            XDP_REDIRECT,
            to_backend(lab, &ack, n, 8080),
        )]);
        assert_eq!(
            lab.session6(SessionTable::Verified, &skey).unwrap().backend,
            lab.backend_id("web6", backend6(n, 8080))
        );
        let s = Frame6Spec::tcp(client(42010), sa(VIP), SYN);
        lab.check(&[Fixture::rewritten(
            "new flow of a persisted client: its backend",
            s.build(),
            XDP_REDIRECT,
            to_backend(lab, &s, n, 8080),
        )]);
        let before = lab.listener_counters("web6");
        // 1 s persistence: after 1.5 s of silence the client is scheduled afresh.
        std::thread::sleep(Duration::from_millis(1500));
        handshake(lab, client(42020));
        let after = lab.listener_counters("web6");
        assert_eq!(
            after.session_hits, before.session_hits,
            "no hit on an expired entry"
        );
        assert_eq!(
            after.session_new,
            before.session_new + 1,
            "client rescheduled"
        );

        // A /64 persistence mask: every address of the prefix is one client.
        let mut masked = web(600);
        l4(&mut masked).persist_mask = Some(64);
        lab.apply(vec![masked]);
        let n = handshake(lab, remote(7, 1, 1000));
        for host in 2..8 {
            let s = Frame6Spec::tcp(remote(7, host, 1000), sa(VIP), SYN);
            lab.check(&[Fixture::rewritten(
                "another address of the persisted /64: its backend",
                s.build(),
                XDP_REDIRECT,
                to_backend(lab, &s, n, 8080),
            )]);
        }
        let pkey = session_key(lab, "web6", *remote(7, 1, 0).ip(), 64);
        assert!(lab.session6(SessionTable::Verified, &pkey).is_some());
    });
}

/// A backend's 4 000-byte UDP answer over IPv6, fragmented by its stack (fragment headers,
/// 1 448-byte pieces), reaches the client from the VIP in every fragment and reassembles
/// into the datagram as from the VIP.
#[test]
fn ipv6_a_fragmented_udp_reply_reaches_the_client_from_the_vip() {
    with_lab(|lab| {
        lab.apply(vec![dns()]);
        let q = Frame6Spec::udp(client(5300), sa(UDP_VIP), b"large query");
        let (v, out) = lab.run(&q.build());
        assert_eq!(v, XDP_REDIRECT);
        let n = backend_of(&out);
        let body: Vec<u8> = (0..4000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut answer = Frame6Spec::udp(backend6(n, 5353), client(5300), &body);
        answer.src_mac = backend_mac(n);
        answer.dst_mac = lab.backend_if_mac;
        let pieces = fragments6(&answer.build(), 1448, 0x0bad_cafe);
        assert_eq!(pieces.len(), 3);
        let rewritten = lab.counter("reply_frag_rewritten");
        let vip = sa(UDP_VIP).ip().octets();
        let mut outs = Vec::new();
        for (i, f) in pieces.iter().enumerate() {
            let (v, out) = lab.run_on(lab.backend_if, f);
            assert_eq!(v, XDP_REDIRECT, "fragment {i}");
            assert_eq!(&out[14 + 8..14 + 24], &vip, "fragment {i} from the VIP");
            assert_eq!(&out[0..6], &CLIENT_MAC, "fragment {i} to the client");
            outs.push(out);
        }
        assert_eq!(lab.counter("reply_frag_rewritten"), rewritten + 2);
        let mut expected = answer.clone();
        expected.src = sa(UDP_VIP);
        expected.hop_limit -= 1;
        expected.src_mac = lab.client_if_mac;
        expected.dst_mac = CLIENT_MAC;
        let whole = reassemble6(&outs).expect("one datagram");
        verify_checksums6(&whole).expect("checksums of the whole datagram");
        assert_eq!(whole, expected.build(), "the datagram as from the VIP");

        // Another identification: not noted, the stack's.
        let other = fragments6(&answer.build(), 1448, 0x0bad_cafd).remove(1);
        lab.check(&[
            Fixture::unchanged("a later fragment of no noted datagram", other, XDP_PASS)
                .on(lab.backend_if),
        ]);
        // A client's fragments to the VIP: dropped, first and later alike.
        let big = Frame6Spec::udp(client(5301), sa(UDP_VIP), &body);
        for f in fragments6(&big.build(), 1448, 7) {
            assert_eq!(lab.run(&f).0, XDP_DROP);
        }
        assert!(
            lab.half_open6(&conn_key(lab, "dns6", client(5301), PROTO_UDP))
                .is_none()
        );
    });
}

#[test]
fn ipv6_udp_is_verified_by_a_two_way_exchange_and_a_zero_checksum_is_dropped() {
    with_lab(|lab| {
        lab.apply(vec![dns()]);
        let a = Frame6Spec::udp(client(5000), sa(UDP_VIP), b"query-a");
        let (v, out) = lab.run(&a.build());
        assert_eq!(v, XDP_REDIRECT);
        let n = backend_of(&out);
        let key = conn_key(lab, "dns6", client(5000), PROTO_UDP);
        assert_eq!(lab.half_open6(&key).unwrap().kind, HALF_UDP);
        lab.check(&[Fixture::rewritten(
            "UDP: same socket, same backend (unverified)",
            a.build(),
            XDP_REDIRECT,
            to_backend(lab, &a, n, 5353),
        )]);
        assert!(lab.conn6(&key).is_none());
        let mut answer = Frame6Spec::udp(backend6(n, 5353), client(5000), b"answer");
        answer.src_mac = backend_mac(n);
        answer.dst_mac = lab.backend_if_mac;
        let mut back = answer.clone();
        back.src = sa(UDP_VIP);
        back.hop_limit -= 1;
        back.src_mac = lab.client_if_mac;
        back.dst_mac = CLIENT_MAC;
        lab.check(&[Fixture::rewritten(
            "UDP answer: source NAT back to the VIP",
            answer.build(),
            XDP_REDIRECT,
            back.build(),
        )
        .on(lab.backend_if)]);
        lab.check(&[Fixture::rewritten(
            "UDP: a client packet after the backend answered: verified",
            a.build(),
            XDP_REDIRECT,
            to_backend(lab, &a, n, 5353),
        )]);
        assert_eq!(lab.conn6(&key).unwrap().state, CONN_OPEN);
        let mut none = Frame6Spec::udp(client(5002), sa(UDP_VIP), b"no checksum");
        none.udp_no_checksum = true;
        lab.check(&[Fixture::unchanged(
            "UDP checksum 0 over IPv6 (illegal): dropped, no state",
            none.build(),
            XDP_DROP,
        )]);
        assert_eq!(lab.counter("drop_udp6_zero_csum"), 1);
        assert!(
            lab.half_open6(&conn_key(lab, "dns6", client(5002), PROTO_UDP))
                .is_none()
        );
    });
}

#[test]
fn malformed_spoofed_and_expiring_ipv6_packets_to_a_vip_are_dropped_with_a_reason() {
    with_lab(|lab| {
        let mut l = web(600);
        l.backends.push(BackendSpec::new(backend6(7, 8080), 10));
        lab.apply(vec![l]);
        let syn = Frame6Spec::tcp(client(46000), sa(VIP), SYN);
        let from = |ip: &str| {
            Frame6Spec::tcp(
                SocketAddrV6::new(ip.parse().unwrap(), 5555, 0, 0),
                sa(VIP),
                SYN,
            )
            .build()
        };
        let opts = |n: usize| {
            let mut s = syn.clone();
            for _ in 0..n {
                s = s.ext(DEST_OPTS, vec![1, 4, 0, 0, 0, 0]);
            }
            s.build()
        };
        let mut long_payload = syn.build();
        long_payload[18..20].copy_from_slice(&1400u16.to_be_bytes());
        let mut cut_tcp = syn.build();
        cut_tcp.truncate(14 + 40 + 10);
        cut_tcp[18..20].copy_from_slice(&10u16.to_be_bytes());
        let mut cut_ext = opts(1);
        cut_ext[14 + 40 + 1] = 20; // the header claims 168 bytes
        let mut v4_in_v6 = syn.build();
        v4_in_v6[14] = 0x40;
        let mut hop1 = syn.clone();
        hop1.hop_limit = 1;
        let mut hop0 = syn.clone();
        hop0.hop_limit = 0;
        lab.check(&[
            Fixture::unchanged(
                "fragment header to a VIP",
                syn.clone().ext(FRAGMENT, vec![0, 1, 0, 0, 0, 1]).build(),
                XDP_DROP,
            ),
            Fixture::unchanged(
                "routing header to a VIP (the VIP may not be the destination)",
                syn.clone().ext(ROUTING, vec![0, 0, 0, 0, 0, 0]).build(),
                XDP_DROP,
            ),
            Fixture::unchanged("five options headers (past the bound)", opts(5), XDP_DROP),
            Fixture::unchanged("options header cut off", cut_ext, XDP_DROP),
            Fixture::unchanged("payload length beyond the frame", long_payload, XDP_DROP),
            Fixture::unchanged("TCP header cut off", cut_tcp, XDP_DROP),
            Fixture::unchanged("version 4 in an IPv6 frame", v4_in_v6, XDP_DROP),
            Fixture::unchanged("hop limit 1", hop1.build(), XDP_DROP),
            Fixture::unchanged("hop limit 0", hop0.build(), XDP_DROP),
            Fixture::unchanged("source ::1", from("::1"), XDP_DROP),
            Fixture::unchanged("source ::", from("::"), XDP_DROP),
            Fixture::unchanged("source ff02::1 (multicast)", from("ff02::1"), XDP_DROP),
            Fixture::unchanged("source fe80::1 (link-local)", from("fe80::1"), XDP_DROP),
            Fixture::unchanged(
                "source ::ffff:10.2.0.1 (IPv4-mapped)",
                from("::ffff:10.2.0.1"),
                XDP_DROP,
            ),
            Fixture::unchanged("source: the VIP itself", from("fd00::100"), XDP_DROP),
            Fixture::unchanged("source: a backend", from("fd00:10::7"), XDP_DROP),
            Fixture::unchanged(
                "source: the balancer's own address",
                from("fd00:1::1"),
                XDP_DROP,
            ),
        ]);
        assert_eq!(lab.counter("drop_fragment"), 1);
        assert_eq!(lab.counter("drop_bad_exthdr"), 3);
        assert_eq!(lab.counter("drop_truncated_ip"), 1);
        assert_eq!(lab.counter("drop_truncated_l4"), 1);
        assert_eq!(lab.counter("drop_bad_version"), 1);
        assert_eq!(lab.counter("drop_ttl"), 2);
        assert_eq!(lab.counter("drop_src_martian"), 5);
        assert_eq!(lab.counter("drop_src_vip"), 1);
        assert_eq!(lab.counter("drop_src_backend"), 1);
        assert_eq!(lab.counter("drop_src_local"), 1);
        assert_eq!(lab.counter("verdict_drop"), 17);
        assert!(
            lab.half_open6(&conn_key(lab, "web6", client(46000), PROTO_TCP))
                .is_none()
        );
        assert_eq!(
            lab.listener_counters("web6").new_conns,
            0,
            "nothing scheduled"
        );
        // Four options headers are within the bound: forwarded.
        let (v, out) = lab.run(&opts(4));
        assert_eq!(v, XDP_REDIRECT, "four options headers are walked");
        assert_eq!(parse6(&out).unwrap().proto, 6);
    });
}

#[test]
fn neighbour_discovery_echo_and_foreign_ipv6_traffic_pass_untouched() {
    with_lab(|lab| {
        lab.apply(vec![web(0)]);
        let vip: Ipv6Addr = "fd00::100".parse().unwrap();
        let mut ns_body = vec![0u8; 4];
        ns_body.extend_from_slice(&vip.octets());
        let mut ns = Frame6Spec::icmp(CLIENT6, vip, NEIGHBOR_SOLICIT, 0, &ns_body);
        ns.hop_limit = 255;
        let mut na = Frame6Spec::icmp(CLIENT6, vip, NEIGHBOR_ADVERT, 0, &ns_body);
        na.hop_limit = 255;
        let mut mcast_ns = ns.clone();
        mcast_ns.dst = SocketAddrV6::new("ff02::1:ff00:100".parse().unwrap(), 0, 0, 0);
        let echo = Frame6Spec::icmp(CLIENT6, vip, ECHO_REQUEST, 0, &[0, 1, 0, 1, 9, 9]);
        lab.check(&[
            Fixture::unchanged("neighbour solicitation to the VIP", ns.build(), XDP_PASS),
            Fixture::unchanged("neighbour advertisement to the VIP", na.build(), XDP_PASS),
            Fixture::unchanged("solicited-node multicast", mcast_ns.build(), XDP_PASS),
            Fixture::unchanged("echo request to the VIP", echo.build(), XDP_PASS),
            Fixture::unchanged(
                "TCP to another IPv6 address",
                Frame6Spec::tcp(client(1), sa("[fd00::101]:80"), SYN).build(),
                XDP_PASS,
            ),
            Fixture::unchanged(
                "VIP port without a listener",
                Frame6Spec::tcp(client(1), sa("[fd00::100]:81"), SYN).build(),
                XDP_PASS,
            ),
            Fixture::unchanged(
                "UDP to the TCP listener's port",
                Frame6Spec::udp(client(1), sa(VIP), b"x").build(),
                XDP_PASS,
            ),
            Fixture::unchanged(
                "a fragment not to a VIP",
                Frame6Spec::tcp(client(1), sa("[fd00::101]:80"), SYN)
                    .ext(FRAGMENT, vec![0, 1, 0, 0, 0, 1])
                    .build(),
                XDP_PASS,
            ),
            Fixture::unchanged(
                "no next header to the VIP",
                {
                    let mut s = Frame6Spec::tcp(client(1), sa(VIP), 0);
                    s.proto = 59;
                    s.build()
                },
                XDP_PASS,
            ),
            Fixture::unchanged(
                "frame too short for an IPv6 header",
                {
                    let mut f = Frame6Spec::tcp(client(1), sa(VIP), SYN).build();
                    f.truncate(14 + 30);
                    f
                },
                XDP_PASS,
            ),
        ]);
        assert_eq!(lab.counter("tail_call_failed"), 0);
        assert_eq!(lab.listener_counters("web6").fwd_packets, 0);
    });
}

#[test]
fn an_ipv6_mid_stream_packet_without_state_gets_a_reset() {
    with_lab(|lab| {
        lab.apply(vec![web(0)]);
        let c = remote(0, 7, 1);
        let ack = Frame6Spec::tcp(c, sa(VIP), ACK);
        let mut rst = Frame6Spec::tcp(sa(VIP), c, RST);
        rst.src_mac = LB_MAC;
        rst.dst_mac = CLIENT_MAC;
        rst.seq = ack.ack; // RFC 9293: <SEQ=SEG.ACK><CTL=RST>
        rst.ack = 0;
        let mut expected = rst.build();
        // Built in place: window 0, checksum over that.
        let t = 14 + 40;
        expected[t + 14..t + 18].fill(0);
        let ck = l4_checksum(sa(VIP).ip(), c.ip(), 6, &expected[t..]);
        expected[t + 16..t + 18].copy_from_slice(&ck.to_be_bytes());
        lab.check(&[
            Fixture::rewritten(
                "unknown IPv6 flow, round robin: RST",
                ack.build(),
                XDP_TX,
                expected,
            ),
            Fixture::unchanged(
                "stray RST: dropped",
                Frame6Spec::tcp(c, sa(VIP), RST).build(),
                XDP_DROP,
            ),
        ]);
        assert_eq!(lab.counter("rst_sent"), 1);
    });
}

#[test]
fn an_icmpv6_packet_too_big_about_a_flow_reaches_its_backend() {
    with_lab(|lab| {
        lab.apply(vec![web(0)]);
        let c = client(49000);
        let n = handshake(lab, c);
        // The backend's reply as clb sent it on, quoted by a router: "packet too big, 1280".
        let mut sent = Frame6Spec::tcp(sa(VIP), c, ACK | PSH).payload(&[7u8; 64]);
        sent.hop_limit = 63;
        let router: Ipv6Addr = "fd00:2::fe".parse().unwrap();
        let vip = *sa(VIP).ip();
        let input = icmp6_error(
            router,
            vip,
            PACKET_TOO_BIG,
            0,
            1280,
            &sent.build(),
            usize::MAX,
        );
        let mut own = sent.clone();
        own.src = backend6(n, 8080);
        let mut expected = icmp6_error(
            router,
            *backend6(n, 8080).ip(),
            PACKET_TOO_BIG,
            0,
            1280,
            &own.build(),
            usize::MAX,
        );
        expected[0..6].copy_from_slice(&backend_mac(n));
        expected[6..12].copy_from_slice(&lab.backend_if_mac);
        expected[21] -= 1; // hop limit (the ICMPv6 checksum does not cover it)
        lab.check(&[Fixture::rewritten(
            "packet too big about a flow: NATed (outer and quoted) to its backend",
            input,
            XDP_REDIRECT,
            expected,
        )]);
        assert_eq!(lab.counter("icmp_nated"), 1);
        // A short quote (headers only) still reaches the backend, checksums consistent.
        let short = icmp6_error(router, vip, DEST_UNREACH, 4, 0, &sent.build(), 40 + 8);
        let (v, out) = lab.run(&short);
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(parse6(&out).unwrap().dst.ip(), backend6(n, 0).ip());
        clb_tests::packet6::verify_checksums6(&out).unwrap();
        // About a flow clb does not track: passed untouched.
        let mut other = sent.clone();
        other.dst = client(49999);
        let stray = icmp6_error(
            router,
            vip,
            PACKET_TOO_BIG,
            0,
            1280,
            &other.build(),
            usize::MAX,
        );
        lab.check(&[Fixture::unchanged(
            "ICMPv6 about an unknown flow passes",
            stray,
            XDP_PASS,
        )]);
    });
}

#[test]
fn ipv6_dsr_rewrites_only_the_macs() {
    with_lab(|lab| {
        let mut l = ListenerSpec::new("dsr6", sa(VIP), Proto::Tcp);
        l4(&mut l).forward = Forward::Dsr;
        l.backends = (2..=3)
            .map(|n| BackendSpec::new(backend6(n, 80), 10))
            .collect();
        lab.apply(vec![l]);
        let syn = Frame6Spec::tcp(client(48000), sa(VIP), SYN);
        let (v, out) = lab.run(&syn.build());
        assert_eq!(v, XDP_REDIRECT);
        let n = out[5];
        let mut expected = syn.clone();
        expected.hop_limit -= 1;
        expected.src_mac = lab.backend_if_mac;
        expected.dst_mac = backend_mac(n);
        assert_eq!(out, expected.build(), "only MACs and hop limit change");
        let ack = Frame6Spec::tcp(client(48000), sa(VIP), ACK);
        let mut e = ack.clone();
        e.hop_limit -= 1;
        e.src_mac = lab.backend_if_mac;
        e.dst_mac = backend_mac(n);
        let key = conn_key(lab, "dsr6", client(48000), PROTO_TCP);
        lab.check(&[Fixture::rewritten(
            "DSR: the handshake ACK, forwarded (it proves nothing: clb never saw the SYN-ACK)",
            ack.build(),
            XDP_REDIRECT,
            e.build(),
        )]);
        assert!(
            lab.conn6(&key).is_none(),
            "a SYN + ACK pair writes no connection"
        );
        let data = Frame6Spec::tcp(client(48000), sa(VIP), ACK | PSH).payload(b"hello");
        let mut e = data.clone();
        e.hop_limit -= 1;
        e.src_mac = lab.backend_if_mac;
        e.dst_mac = backend_mac(n);
        lab.check(&[Fixture::rewritten(
            "DSR: a data segment after the handshake verifies the flow on the client side",
            data.build(),
            XDP_REDIRECT,
            e.build(),
        )]);
        assert_eq!(lab.conn6(&key).unwrap().state, CONN_OPEN);
        assert_eq!(lab.counter("dsr_forwarded"), 3);
    });
}

#[test]
fn ipv6_maglev_picks_the_backend_user_space_predicts() {
    with_lab(|lab| {
        let mut l = web(600);
        l4(&mut l).sched = Sched::Maglev;
        l4(&mut l).persist_mask = Some(64);
        lab.apply(vec![l]);
        let members: Vec<Member> = (2..=4u8)
            .map(|n| Member {
                id: lab.backend_id("web6", backend6(n, 8080)),
                addr: backend6(n, 8080).into(),
                weight: 10,
            })
            .collect();
        let table = maglev::table(&members, clb_common::DEFAULT_MAGLEV_SIZE);
        let vip = ip6_to_be(sa(VIP).ip().octets());
        let predict = |c: SocketAddrV6| -> u8 {
            let masked = mask6(ip6_to_be(c.ip().octets()), prefix_mask6_be(64));
            let h = client_hash6(masked, vip, port_to_be(80), PROTO_TCP);
            let id = table[(h as usize) % table.len()];
            match members.iter().find(|m| m.id == id).unwrap().addr {
                std::net::SocketAddr::V6(a) => a.ip().octets()[15],
                std::net::SocketAddr::V4(_) => unreachable!("IPv6 members"),
            }
        };
        let mut seen = std::collections::HashSet::new();
        for net in 0..30u16 {
            let c = remote(net, 1, 40000);
            let (v, out) = lab.run(&Frame6Spec::tcp(c, sa(VIP), SYN).build());
            assert_eq!(v, XDP_REDIRECT);
            assert_eq!(backend_of(&out), predict(c), "client {c}");
            seen.insert(backend_of(&out));
            // Mid-stream without state: where the hash says (adopted), not reset.
            let other = remote(net, 2, 40001);
            let (v, out) = lab.run(&Frame6Spec::tcp(other, sa(VIP), ACK).build());
            assert_eq!(v, XDP_REDIRECT);
            assert_eq!(backend_of(&out), predict(other));
        }
        assert_eq!(seen.len(), 3, "30 prefixes use every backend");
    });
}
