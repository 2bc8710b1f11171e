//! Packet-level tests of the XDP datapath through `BPF_PROG_TEST_RUN`, provisioned through
//! the daemon's own control-plane code. Each table row: input frame, expected verdict,
//! expected output frame (checksums recomputed from scratch and compared).

use std::{net::SocketAddrV4, time::Duration};

use clb::{
    model::{BackendSpec, ListenerSpec, Proto},
    time::monotonic_ns,
};
use clb_common::{CONN_FIN, ConnKey, ConnValue, NS_PER_SEC, PROTO_TCP, ip_to_be, port_to_be};
use clb_tests::{
    lab::{
        Fixture, PacketLab, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, backend, backend_mac,
        with_lab,
    },
    packet::{ACK, CLIENT_MAC, FIN, FrameSpec, PSH, RST, SYN, parse},
};

const VIP: &str = "10.0.0.100:80";
const UDP_VIP: &str = "10.0.0.100:53";

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new("10.0.1.2".parse().unwrap(), port)
}

fn web(persist: u32) -> ListenerSpec {
    let mut l = ListenerSpec::new("web", sa(VIP), Proto::Tcp);
    l.persist = persist;
    l.backends = (2..=4)
        .map(|n| BackendSpec {
            addr: backend(n, 8080),
            weight: 10,
        })
        .collect();
    l
}

fn dns() -> ListenerSpec {
    let mut l = ListenerSpec::new("dns", sa(UDP_VIP), Proto::Udp);
    l.backends = (5..=6)
        .map(|n| BackendSpec {
            addr: backend(n, 5353),
            weight: 10,
        })
        .collect();
    l
}

/// `spec` as the balancer must forward it to backend `10.1.0.n:port`.
fn to_backend(lab: &PacketLab, spec: &FrameSpec, n: u8, port: u16) -> Vec<u8> {
    let mut s = spec.clone();
    s.dst = backend(n, port);
    s.ttl -= 1;
    s.src_mac = lab.backend_if_mac;
    s.dst_mac = backend_mac(n);
    s.build()
}

/// The backend whose address the forwarded frame carries.
fn backend_of(frame: &[u8]) -> u8 {
    parse(frame).unwrap().dst.ip().octets()[3]
}

fn conn_key(lab: &PacketLab, listener: &str, client: SocketAddrV4, proto: u8) -> ConnKey {
    ConnKey {
        client: ip_to_be(client.ip().octets()),
        client_port: port_to_be(client.port()),
        listener: lab.lb.listeners()[listener].id.unwrap() as u16,
        proto,
        _pad: [0; 3],
    }
}

fn backdate_conn(lab: &mut PacketLab, key: &ConnKey, secs: u64) {
    let dp = lab.lb.dataplane_mut();
    let v = dp.conn(key).unwrap().expect("connection entry");
    dp.put_conn(
        *key,
        ConnValue {
            last_seen_ns: monotonic_ns() - secs * NS_PER_SEC,
            ..v
        },
    )
    .unwrap();
}

#[test]
fn new_flows_are_rewritten_round_robin_and_stay_on_their_backend() {
    with_lab(|lab| {
        lab.lb.apply(vec![web(0)]).unwrap();
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
        // Later packets of each flow stay on its backend, whatever the round robin says.
        let mut rows = Vec::new();
        for (i, n) in order.iter().enumerate().rev() {
            let s = FrameSpec::tcp(client(40000 + i as u16), sa(VIP), ACK | PSH)
                .payload(b"GET / HTTP/1.1\r\n\r\n");
            rows.push(Fixture::rewritten(
                "established flow: same backend",
                s.build(),
                XDP_REDIRECT,
                to_backend(lab, &s, *n, 8080),
            ));
        }
        lab.check(&rows);
        let st = lab.lb.stats().unwrap();
        assert_eq!(st.listeners[0].counters.new_conns, 3);
        assert_eq!(st.listeners[0].counters.fwd_packets, 6);
    });
}

#[test]
fn reply_path_rewrites_source_back_to_the_vip() {
    with_lab(|lab| {
        lab.lb.apply(vec![web(0)]).unwrap();
        let syn = FrameSpec::tcp(client(41000), sa(VIP), SYN).build();
        let (v, out) = lab.run(&syn);
        assert_eq!(v, XDP_REDIRECT);
        let n = backend_of(&out);
        let mut reply = FrameSpec::tcp(backend(n, 8080), client(41000), SYN | ACK);
        reply.src_mac = backend_mac(n);
        reply.dst_mac = lab.backend_if_mac;
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
            // A backend packet to a client port with no connection is not ours: pass.
            Fixture::unchanged(
                "backend packet without a connection passes",
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
fn persistence_keeps_new_flows_of_a_client_on_one_backend_until_it_expires() {
    with_lab(|lab| {
        lab.lb.apply(vec![web(1)]).unwrap();
        let (v, first) = lab.run(&FrameSpec::tcp(client(42000), sa(VIP), SYN).build());
        assert_eq!(v, XDP_REDIRECT);
        let n = backend_of(&first);
        // Other clients advance the round robin in between.
        for p in 0..2u8 {
            let other = FrameSpec::tcp(
                SocketAddrV4::new([10, 2, 0, 9 + p].into(), 50000),
                sa(VIP),
                SYN,
            );
            assert_eq!(lab.run(&other.build()).0, XDP_REDIRECT);
        }
        for port in 42001..42004 {
            let s = FrameSpec::tcp(client(port), sa(VIP), SYN);
            lab.check(&[Fixture::rewritten(
                "new flow of a persisted client: its backend",
                s.build(),
                XDP_REDIRECT,
                to_backend(lab, &s, n, 8080),
            )]);
        }
        let before = lab.lb.stats().unwrap().listeners[0].counters;
        assert_eq!(before.session_hits, 3);
        assert_eq!(lab.lb.sessions(None).unwrap().len(), 3);
        // persist = 1 s: after 1.5 s of silence (1 s + the 0.25 s refresh slack) the
        // entry is expired and the client's next connection is scheduled afresh.
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            lab.lb.sessions(None).unwrap().is_empty(),
            "expired entries are not listed"
        );
        assert_eq!(
            lab.run(&FrameSpec::tcp(client(42010), sa(VIP), SYN).build())
                .0,
            XDP_REDIRECT
        );
        let after = lab.lb.stats().unwrap().listeners[0].counters;
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
fn quiescent_backend_gets_no_new_clients_but_keeps_its_flows() {
    with_lab(|lab| {
        lab.lb.apply(vec![web(600)]).unwrap();
        let est = FrameSpec::tcp(client(43000), sa(VIP), SYN);
        let (_, out) = lab.run(&est.build());
        let n = backend_of(&out);
        let mut cfg = vec![web(600)];
        for b in &mut cfg[0].backends {
            if b.addr == backend(n, 8080) {
                b.weight = 0;
            }
        }
        lab.lb.apply(cfg).unwrap();
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

#[test]
fn idle_timeout_and_fin_aging_expire_connections() {
    with_lab(|lab| {
        let mut l = web(0);
        l.idle_timeout = Some(900);
        lab.lb.apply(vec![l]).unwrap();
        let c = client(44000);
        let (_, out) = lab.run(&FrameSpec::tcp(c, sa(VIP), SYN).build());
        let n = backend_of(&out);
        let key = conn_key(lab, "web", c, PROTO_TCP);
        // Idle 899 s: still established.
        backdate_conn(lab, &key, 899);
        let ack = FrameSpec::tcp(c, sa(VIP), ACK);
        lab.check(&[Fixture::rewritten(
            "idle below the timeout: forwarded",
            ack.build(),
            XDP_REDIRECT,
            to_backend(lab, &ack, n, 8080),
        )]);
        // Idle 902 s (> 900 + slack): the entry counts as absent, the client gets a RST.
        backdate_conn(lab, &key, 902);
        let mut rst = FrameSpec::tcp(sa(VIP), c, RST);
        rst.src_mac = clb_tests::packet::LB_MAC;
        rst.dst_mac = CLIENT_MAC;
        rst.seq = ack.ack; // RFC 9293: <SEQ=SEG.ACK><CTL=RST>
        rst.ack = 0;
        rst.frag = 0x4000;
        let expected_rst = {
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
        };
        lab.check(&[Fixture::rewritten(
            "idle past the timeout: no connection, RST back to the client",
            ack.build(),
            XDP_TX,
            expected_rst,
        )]);
        assert_eq!(lab.counter("rst_sent"), 1);

        // FIN aging: after a FIN the entry lives at most 120 s, not the 900 s idle timeout.
        let c2 = client(44001);
        let (_, out) = lab.run(&FrameSpec::tcp(c2, sa(VIP), SYN).build());
        let n2 = backend_of(&out);
        let fin = FrameSpec::tcp(c2, sa(VIP), FIN | ACK);
        lab.check(&[Fixture::rewritten(
            "FIN: forwarded",
            fin.build(),
            XDP_REDIRECT,
            to_backend(lab, &fin, n2, 8080),
        )]);
        let key2 = conn_key(lab, "web", c2, PROTO_TCP);
        assert_eq!(
            lab.lb.dataplane().conn(&key2).unwrap().unwrap().state,
            CONN_FIN
        );
        backdate_conn(lab, &key2, 100);
        let last_ack = FrameSpec::tcp(c2, sa(VIP), ACK);
        lab.check(&[Fixture::rewritten(
            "FIN seen 100 s ago: forwarded",
            last_ack.build(),
            XDP_REDIRECT,
            to_backend(lab, &last_ack, n2, 8080),
        )]);
        backdate_conn(lab, &key2, 121);
        let (v, _) = lab.run(&last_ack.build());
        assert_eq!(v, XDP_TX, "FIN seen 121 s ago: the entry is gone, RST");
    });
}

#[test]
fn mid_stream_packet_of_a_persisted_client_goes_to_its_backend() {
    with_lab(|lab| {
        lab.lb.apply(vec![web(600)]).unwrap();
        let (_, out) = lab.run(&FrameSpec::tcp(client(45000), sa(VIP), SYN).build());
        let n = backend_of(&out);
        // A flow the connection table never saw (e.g. evicted): not scheduled as new, but
        // sent where the client is persisted, and given an entry.
        let mid = FrameSpec::tcp(client(45999), sa(VIP), ACK).payload(b"data");
        lab.check(&[Fixture::rewritten(
            "mid-stream, persisted client",
            mid.build(),
            XDP_REDIRECT,
            to_backend(lab, &mid, n, 8080),
        )]);
        let key = conn_key(lab, "web", client(45999), PROTO_TCP);
        assert!(lab.lb.dataplane().conn(&key).unwrap().is_some());
        // A stray RST of an unknown flow of an unpersisted client is dropped, not answered.
        let rst = FrameSpec::tcp(
            SocketAddrV4::new("10.2.0.7".parse().unwrap(), 1),
            sa(VIP),
            RST,
        );
        lab.check(&[Fixture::unchanged(
            "stray RST: dropped",
            rst.build(),
            XDP_DROP,
        )]);
    });
}

#[test]
fn udp_flows_and_udp_persistence() {
    with_lab(|lab| {
        let mut d = dns();
        lab.lb.apply(vec![d.clone()]).unwrap();
        let a = FrameSpec::udp(client(5000), sa(UDP_VIP), b"query-a");
        let (v, out) = lab.run(&a.build());
        assert_eq!(v, XDP_REDIRECT);
        let n = backend_of(&out);
        lab.check(&[
            Fixture::rewritten(
                "UDP: same socket, same backend",
                a.build(),
                XDP_REDIRECT,
                to_backend(lab, &a, n, 5353),
            ),
            Fixture::rewritten(
                "UDP: same socket, same backend",
                a.build(),
                XDP_REDIRECT,
                to_backend(lab, &a, n, 5353),
            ),
        ]);
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
        lab.lb.apply(vec![d]).unwrap();
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

#[test]
fn foreign_traffic_passes_untouched() {
    with_lab(|lab| {
        lab.lb.apply(vec![web(0)]).unwrap();
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
            Fixture::unchanged("ICMP to the VIP passes", icmp.build(), XDP_PASS),
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
        assert_eq!(lab.lb.stats().unwrap().listeners[0].counters.fwd_packets, 0);
    });
}

#[test]
fn malformed_vip_packets_are_dropped_with_a_reason_and_ip_options_are_forwarded() {
    with_lab(|lab| {
        lab.lb.apply(vec![web(0)]).unwrap();
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
            lab.lb.stats().unwrap().listeners[0].counters.new_conns,
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
