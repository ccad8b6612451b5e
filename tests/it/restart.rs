//! Graceful shutdown and recovery (PROTOCOL.md §3.3 `goaway`, §4.1; STYLE habit 13): SIGTERM
//! gives every connected client `goaway` then close 1001 and exits 0; a restart on the same data
//! directory has every message, every cursor, and continues the sequence numbers without a gap.

use parley::protocol::close;
use parley::protocol::{ClientFrame, ServerFrame};

use crate::common::{dialog, http, Client, Server, TestDir};

/// SIGTERM; every client must get `goaway` and then close 1001; the process must exit 0.
async fn stop_gracefully(srv: &mut Server, clients: Vec<Client>) {
    stop_gracefully_with(srv, clients, None).await
}

/// [`stop_gracefully`], with a socket that has not said `hello`: it must get close 1001.
async fn stop_gracefully_with(srv: &mut Server, clients: Vec<Client>, silent: Option<&mut Client>) {
    srv.sigterm();
    if let Some(c) = silent {
        let (frames, code) = c.until_closed().await;
        assert_eq!(code, Some(close::GOING_AWAY), "a socket without hello at shutdown; frames: {frames:?}");
    }
    for mut c in clients {
        let (frames, code) = c.until_closed().await;
        let goaway = frames.iter().position(|f| matches!(f, ServerFrame::Goaway { .. }));
        let Some(g) = goaway else { panic!("no goaway before the close {code:?}: {frames:?}") };
        assert_eq!(g, frames.len() - 1, "goaway is the last frame before the close: {frames:?}");
        if let ServerFrame::Goaway { reason, retry_after_ms } = &frames[g] {
            assert!(!reason.is_empty());
            assert!(*retry_after_ms <= 60_000, "retry_after_ms {retry_after_ms}");
        }
        assert_eq!(code, Some(close::GOING_AWAY));
    }
    let status = srv.wait_exit().await;
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM: {status:?}\n{}", srv.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_then_restart_keeps_everything_and_continues_the_sequences() {
    const N: usize = 60;
    const M: usize = 20;
    let dir = TestDir::new();
    let mut srv = Server::start(&dir).await;
    let a = srv.user("alice").await;
    let b = srv.user("bob").await;
    let t = dialog(6, N + M);

    let mut alice = srv.connect(&a, None).await.client;
    let mut bob = srv.connect(&b, None).await.client;
    for (k, body) in t[..N].iter().enumerate() {
        alice.send_msg(&format!("m{k}"), "bob", body).await;
    }
    for k in 0..N {
        assert_eq!(alice.ack(&format!("m{k}")).await.1, k as u64 + 1);
    }
    // bob reads everything live and confirms the first half.
    for k in 0..N {
        let (ev, m) = bob.message_event().await;
        assert_eq!((ev, m.body.as_str()), (k as u64 + 1, t[k].as_str()));
    }
    bob.send(ClientFrame::Received { up_to: (N / 2) as u64 }).await;
    bob.barrier().await;

    stop_gracefully(&mut srv, vec![alice, bob]).await;

    // Same data directory, new process (and port). Tokens, messages and cursors survive.
    srv.restart().await;
    let (st, health) = http(srv.addr, "GET", "/v1/healthz", None, None).await;
    assert_eq!((st, health["status"].as_str()), (200, Some("ok")), "{health}");
    let s = srv.connect(&b, None).await;
    assert_eq!(s.head, N as u64);
    let backlog: Vec<u64> = s.messages().iter().map(|(_, m)| m.seq).collect();
    assert_eq!(backlog, ((N / 2) as u64 + 1..=N as u64).collect::<Vec<_>>(), "the stored cursor survived the restart");
    let mut bob = s.client;
    let all = srv.connect(&b, Some(0)).await;
    let bodies: Vec<String> = all.messages().into_iter().map(|(_, m)| m.body).collect();
    assert_eq!(bodies, t[..N], "the backlog from 0 after the restart");
    all.client.close().await;
    let h = bob.history_all("dm:alice:bob").await;
    assert_eq!(h.iter().map(|m| m.body.clone()).collect::<Vec<_>>(), t[..N], "history after the restart");

    // The sequences continue: seq N+1.., ev N+1.. for bob, without a gap.
    let mut alice = srv.connect(&a, None).await.client;
    for (k, body) in t[N..].iter().enumerate() {
        let (_, seq, _) = alice.send_acked(&format!("m{}", N + k), "bob", body).await;
        assert_eq!(seq, (N + k + 1) as u64);
        let (ev, m) = bob.message_event().await;
        assert_eq!((ev, m.seq, m.body.as_str()), ((N + k + 1) as u64, (N + k + 1) as u64, body.as_str()));
    }
    // A resend of a message from before the restart still gets its original ack.
    assert_eq!(alice.send_acked("m0", "bob", &t[0]).await.1, 1);

    // And once more through a graceful restart: the whole history is intact.
    stop_gracefully(&mut srv, vec![alice, bob]).await;
    srv.restart().await;
    let mut bob = srv.connect(&b, None).await.client;
    let h = bob.history_all("dm:alice:bob").await;
    assert_eq!(h.len(), N + M);
    assert_eq!(h.iter().map(|m| m.body.clone()).collect::<Vec<_>>(), t);
    let report = srv.recovery_report();
    assert_eq!(report["torn_tail_bytes"], 0, "a graceful stop leaves no torn tail: {report}");
}

/// A socket that has not said `hello` yet must not hold up a graceful shutdown: it is closed with
/// 1001 like the others (after a JSON `goaway`), and the server exits promptly.
/// Here the hello timeout (60 s) and the shutdown deadline (30 s) are both longer than the wait
/// for the exit ([`T`](crate::common::T), 20 s), so only a prompt close passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_sockets_that_have_not_said_hello() {
    let dir = TestDir::new();
    let env = [("PARLEY__SESSION__HELLO_TIMEOUT_MS", "60000"), ("PARLEY__SERVER__SHUTDOWN_TIMEOUT_MS", "30000")];
    let mut srv = Server::start_with(&dir, &env).await;
    let a = srv.user("alice").await;
    let alice = srv.connect(&a, None).await.client;
    let mut silent = Client::open_raw(srv.addr, parley::protocol::Encoding::Json).await.expect("connect");
    // The upgrade is done when open_raw returns; the server counts the socket from then on.
    stop_gracefully_with(&mut srv, vec![alice], Some(&mut silent)).await;
}
