//! One conformance suite for both queue backends, so they cannot drift:
//! every test below runs once against the Postgres queue and once against
//! SQS (moto's server, started by scripts/test.sh).

use std::sync::Arc;
use std::time::Duration;

use offload::job::QueueName;
use offload::queue::{OutgoingMessage, Queue, ReceivedMessage};
use offload::testing::{sqs_queue, TestDb};

const Q: QueueName = QueueName::Default;

/// A queue under test, with whatever must live as long as it.
struct Backend {
    queue: Arc<dyn Queue>,
    _db: Option<TestDb>,
}

async fn postgres(max_receive_count: u32) -> Backend {
    let db = TestDb::new().await;
    Backend {
        queue: Arc::new(db.pg_queue(max_receive_count)),
        _db: Some(db),
    }
}

async fn sqs(max_receive_count: u32) -> Backend {
    Backend {
        queue: Arc::new(sqs_queue(max_receive_count).await),
        _db: None,
    }
}

fn msg(id: &str, body: &str, delay_secs: u64) -> OutgoingMessage {
    OutgoingMessage {
        id: id.into(),
        body: body.into(),
        delay: Duration::from_secs(delay_secs),
    }
}

/// Receives until `n` messages arrived or `within` passed (SQS may return
/// fewer than asked per call).
async fn receive_n(
    q: &dyn Queue,
    n: usize,
    visibility: Duration,
    within: Duration,
) -> Vec<ReceivedMessage> {
    let end = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n && tokio::time::Instant::now() < end {
        got.extend(
            q.receive(Q, n - got.len(), visibility, Duration::from_secs(1))
                .await
                .expect("receive"),
        );
    }
    got
}

async fn nothing_visible(q: &dyn Queue, queue: QueueName) -> bool {
    q.receive(queue, 10, Duration::from_secs(30), Duration::ZERO)
        .await
        .expect("receive")
        .is_empty()
}

const VIS: Duration = Duration::from_secs(30);

async fn send_then_receive_hides_the_message(b: Backend) {
    let q = &*b.queue;
    q.send(Q, "hello".into(), Duration::ZERO).await.unwrap();
    let got = receive_n(q, 1, VIS, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, "hello");
    assert_eq!(got[0].receive_count, 1);
    assert!(
        nothing_visible(q, Q).await,
        "a received message is invisible"
    );
}

async fn a_batch_of_ten_arrives_whole(b: Backend) {
    let q = &*b.queue;
    let batch: Vec<_> = (0..10)
        .map(|i| msg(&i.to_string(), &format!("m{i}"), 0))
        .collect();
    q.send_batch(Q, &batch).await.unwrap();
    let got = receive_n(q, 10, VIS, Duration::from_secs(10)).await;
    let mut bodies: Vec<_> = got.iter().map(|m| m.body.clone()).collect();
    bodies.sort();
    let mut want: Vec<_> = (0..10).map(|i| format!("m{i}")).collect();
    want.sort();
    assert_eq!(bodies, want);
}

async fn delay_seconds_hold_a_message_back(b: Backend) {
    let q = &*b.queue;
    q.send_batch(Q, &[msg("a", "later", 2)]).await.unwrap();
    assert!(
        nothing_visible(q, Q).await,
        "delayed message visible at once"
    );
    assert_eq!(q.depth(Q).await.unwrap().delayed, 1);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let got = receive_n(q, 1, VIS, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1, "delayed message never arrived");
}

async fn a_message_reappears_after_its_visibility_timeout(b: Backend) {
    let q = &*b.queue;
    q.send(Q, "again".into(), Duration::ZERO).await.unwrap();
    let first = receive_n(q, 1, Duration::from_secs(1), Duration::from_secs(5)).await;
    assert_eq!(first.len(), 1);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let second = receive_n(q, 1, VIS, Duration::from_secs(5)).await;
    assert_eq!(second.len(), 1, "message did not come back");
    assert_eq!(second[0].message_id, first[0].message_id);
    assert_eq!(second[0].receive_count, 2);
    assert_ne!(second[0].receipt_handle, first[0].receipt_handle);
}

async fn change_visibility_hides_or_releases_a_message(b: Backend) {
    let q = &*b.queue;
    q.send(Q, "x".into(), Duration::ZERO).await.unwrap();
    let got = receive_n(q, 1, VIS, Duration::from_secs(5)).await;
    q.change_visibility(Q, &got[0].receipt_handle, Duration::ZERO)
        .await
        .unwrap();
    let again = receive_n(q, 1, Duration::from_secs(1), Duration::from_secs(5)).await;
    assert_eq!(again.len(), 1, "visibility 0 makes it visible now");
    // Extending beyond the receive's timeout keeps it hidden past that.
    q.change_visibility(Q, &again[0].receipt_handle, Duration::from_secs(4))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        nothing_visible(q, Q).await,
        "extended visibility was not kept"
    );
}

async fn deleted_messages_never_come_back(b: Backend) {
    let q = &*b.queue;
    let batch: Vec<_> = (0..3).map(|i| msg(&i.to_string(), "d", 0)).collect();
    q.send_batch(Q, &batch).await.unwrap();
    let got = receive_n(q, 3, Duration::from_secs(1), Duration::from_secs(5)).await;
    assert_eq!(got.len(), 3);
    q.delete(Q, &got[0].receipt_handle).await.unwrap();
    let rest: Vec<String> = got[1..].iter().map(|m| m.receipt_handle.clone()).collect();
    q.delete_batch(Q, &rest).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(nothing_visible(q, Q).await);
    let d = q.depth(Q).await.unwrap();
    assert_eq!((d.visible, d.in_flight, d.delayed), (0, 0, 0));
}

async fn redrive_moves_a_message_after_max_receive_count(b: Backend) {
    let q = &*b.queue;
    q.send(Q, "poison".into(), Duration::ZERO).await.unwrap();
    for n in 1..=2 {
        let got = receive_n(q, 1, Duration::from_secs(1), Duration::from_secs(5)).await;
        assert_eq!(got.len(), 1, "receive {n}");
        tokio::time::sleep(Duration::from_millis(1300)).await;
    }
    // The third receive would exceed maxReceiveCount = 2: the message moves.
    assert!(nothing_visible(q, Q).await, "message still in its queue");
    let dead = q
        .receive(QueueName::DeadLetter, 10, VIS, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body, "poison");
}

async fn depth_counts_visible_in_flight_and_delayed(b: Backend) {
    let q = &*b.queue;
    q.send_batch(Q, &[msg("1", "a", 0), msg("2", "b", 0), msg("3", "c", 600)])
        .await
        .unwrap();
    let got = q.receive(Q, 1, VIS, Duration::from_secs(1)).await.unwrap();
    assert_eq!(got.len(), 1);
    let d = q.depth(Q).await.unwrap();
    assert_eq!((d.visible, d.in_flight, d.delayed), (1, 1, 1));
    assert_eq!(q.depth(QueueName::High).await.unwrap().visible, 0);
}

async fn a_delay_beyond_fifteen_minutes_is_refused(b: Backend) {
    let q = &*b.queue;
    let err = q.send_batch(Q, &[msg("1", "a", 901)]).await.unwrap_err();
    assert!(err.to_string().contains("delay"), "{err}");
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod on_postgres {
            $(#[tokio::test]
            async fn $name() { super::$name(super::postgres(2).await).await })*
        }
        mod on_sqs {
            $(#[tokio::test]
            async fn $name() { super::$name(super::sqs(2).await).await })*
        }
    };
}

suite!(
    send_then_receive_hides_the_message,
    a_batch_of_ten_arrives_whole,
    delay_seconds_hold_a_message_back,
    a_message_reappears_after_its_visibility_timeout,
    change_visibility_hides_or_releases_a_message,
    deleted_messages_never_come_back,
    redrive_moves_a_message_after_max_receive_count,
    depth_counts_visible_in_flight_and_delayed,
    a_delay_beyond_fifteen_minutes_is_refused,
);
