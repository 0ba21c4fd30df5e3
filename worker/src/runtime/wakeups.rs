//! Job wake-ups: how the pull loop learns that a job was stored.
//!
//! The jobs stream republishes the headers of every job it stores to
//! `<prefix>.wake.<queue>.p<band>.<run_id>`; the pull loop reads them to know
//! which consumers to fetch. How a worker subscribes depends on whether it
//! can take a job:
//!
//! - **Shared** (a slot is free and the last fetch found nothing more): in
//!   the queue's group ([`Names::job_wakeup_group`]), so a wake-up reaches
//!   *one* idle worker of the queue, which fetches. A plain subscription
//!   cost every worker of the queue a delivery per job and every idle worker
//!   a fetch (a pull request and its empty answer) that only one of them
//!   could win.
//! - **Every** (all slots busy, or a backlog: the last fetch came back with
//!   jobs): a plain subscription. A busy worker must not take a shared
//!   wake-up, which would wait for its next free slot while another worker
//!   idles; it still reads every wake-up to learn which bands got jobs, so
//!   a higher band is fetched first when a slot frees. At saturation every
//!   worker stays here and fetches whenever a slot frees, as before.
//!
//! The loop switches to *every* when its slots fill up and back to *shared*
//! when a fetch finds nothing, so at saturation the subscription does not
//! change with every run. A switch subscribes the new way before it
//! unsubscribes the old one and waits for the server to have both (a round
//! trip, [`runfleet_ops::nats::round_trip`]) before it reads what the old
//! subscription received.
//!
//! The round trip is not quite enough: nats-server matches a message
//! against the subscriptions it has, then writes it to each subscriber's
//! connection in turn, and a publisher preempted in between (seen with
//! `nats-server -V` on a busy two-core machine: 290 µs) writes to this
//! connection after the round trip's answer a wake-up it matched before
//! the new subscription, for the old one alone. Dropped at once, the old
//! subscription lost it, and with no other idle worker its job waited for
//! the idle poll (500 ms, about one `runfleet bench signal` trial in
//! 5,000). So a plain subscription given up for a shared one is still read
//! for [`RETIRE_GRACE`]: only a worker that just became idle reads a few
//! wake-ups more. A shared subscription given up for a plain one is dropped
//! at once: a busy worker must not take shared wake-ups, and one it was
//! handed while switching is covered by the other workers' idle poll, as
//! any shared wake-up a worker takes just before its slots fill up.

use async_nats::{Client, Subject, Subscriber};
use futures::stream::SelectAll;
use futures::{FutureExt, StreamExt};
use runfleet_protocol::{Names, QueueName};
use tokio::time::Instant;
use tracing::{debug, warn};

/// How long a switch waits for the server to confirm the new subscription.
const ROUND_TRIP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a plain subscription given up for a shared one is still read
/// (see the module docs).
const RETIRE_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// How the worker receives its queues' wake-ups (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// In each queue's group: one idle worker gets each wake-up.
    Shared,
    /// A plain subscription: every wake-up, taken by no one.
    Every,
}

pub(crate) struct Wakeups {
    client: Client,
    /// Each served queue's wake-up subject and group.
    queues: Vec<(String, String)>,
    mode: Mode,
    /// `None` once the subscriptions ended (the client closed): the loop's
    /// idle poll takes over.
    subscriptions: Option<SelectAll<Subscriber>>,
    /// The plain subscriptions last given up for shared ones, read until
    /// the instant (see the module docs).
    retiring: Option<(SelectAll<Subscriber>, Instant)>,
    /// [`RETIRE_GRACE`], longer in a test.
    retire_grace: std::time::Duration,
}

impl Wakeups {
    /// Subscribes to every queue's wake-ups, shared.
    pub async fn subscribe(
        client: Client,
        names: &Names,
        queues: &[QueueName],
    ) -> Result<Self, super::Error> {
        let queues: Vec<_> = queues
            .iter()
            .map(|queue| (names.job_wakeup_filter(queue), names.job_wakeup_group(queue)))
            .collect();
        let subscriptions = subscribe_all(&client, &queues, Mode::Shared)
            .await
            .map_err(|(subject, source)| super::Error::Subscribe { subject, source })?;
        Ok(Self {
            client,
            queues,
            mode: Mode::Shared,
            subscriptions: Some(subscriptions),
            retiring: None,
            retire_grace: RETIRE_GRACE,
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Subscribes the `to` way, then drops the old subscriptions, handing
    /// what they had received to `woken`. Returns whether the worker now
    /// receives wake-ups the `to` way: on failure the old subscriptions stay
    /// (and a later switch tries again).
    pub async fn switch(&mut self, to: Mode, mut woken: impl FnMut(&str)) -> bool {
        if self.mode == to {
            return true;
        }
        let new = match subscribe_all(&self.client, &self.queues, to).await {
            Ok(new) => new,
            Err((subject, error)) => {
                warn!(subject, error = %error, mode = ?to, "could not change the job wake-up subscription; keeping the old one");
                return false;
            }
        };
        // After a round trip the server has the new subscriptions, and every
        // wake-up it routed to the old ones before them has been read (a
        // flush only writes the socket: a wake-up still on its way to an old
        // subscription was lost when it was dropped, about one switch in a
        // hundred). Bounded: with the connection down the pull loop must
        // still reach its shutdown check; what a lost round trip misses, the
        // idle poll finds.
        if let Err(error) = runfleet_ops::nats::round_trip(&self.client, ROUND_TRIP_TIMEOUT).await {
            warn!(error = %error, "no round trip after changing the job wake-up subscription");
        }
        if let Some(mut old) = self.subscriptions.replace(new) {
            while let Some(Some(message)) = old.next().now_or_never() {
                woken(message.subject.as_str());
            }
            if to == Mode::Shared {
                self.retiring = Some((old, Instant::now() + self.retire_grace));
            }
        }
        debug!(mode = ?to, "job wake-up subscription changed");
        self.mode = to;
        true
    }

    /// A wake-up already received, if any.
    pub fn try_next(&mut self) -> Option<Subject> {
        self.next().now_or_never()
    }

    /// Completes with the subject of the next job wake-up. When the
    /// subscriptions end it logs once, drops them and never completes again
    /// (the idle poll takes over), so an ended subscription cannot spin the
    /// pull loop.
    pub async fn next(&mut self) -> Subject {
        let Some(subscriptions) = self.subscriptions.as_mut() else {
            return std::future::pending().await;
        };
        let next = loop {
            let Some((retiring, until)) = self.retiring.as_mut() else {
                break subscriptions.next().await;
            };
            tokio::select! {
                biased;
                Some(message) = retiring.next() => return message.subject,
                next = subscriptions.next() => break next,
                () = tokio::time::sleep_until(*until) => self.retiring = None,
            }
        };
        if let Some(message) = next {
            return message.subject;
        }
        warn!("job wake-up subscriptions closed; polling every idle_poll");
        self.subscriptions = None;
        std::future::pending().await
    }
}

/// One subscription per queue, the `mode` way; the subject that failed.
async fn subscribe_all(
    client: &Client,
    queues: &[(String, String)],
    mode: Mode,
) -> Result<SelectAll<Subscriber>, (String, async_nats::SubscribeError)> {
    let mut subscriptions = Vec::with_capacity(queues.len());
    for (subject, group) in queues {
        let subscribed = match mode {
            Mode::Shared => client.queue_subscribe(subject.clone(), group.clone()).await,
            Mode::Every => client.subscribe(subject.clone()).await,
        };
        subscriptions.push(subscribed.map_err(|error| (subject.clone(), error))?);
    }
    Ok(futures::stream::select_all(subscriptions))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use super::*;

    use crate::test_nats as nats;

    /// A plain subscription given up for a shared one is still read: here
    /// the queue's group has a second member (the test), which takes about
    /// half of the shared wake-ups, yet every wake-up published after the
    /// switch to shared reaches the worker through the plain subscription
    /// it gave up. Dropped at once, as before, the worker would see about
    /// half. (The race this guards against, a wake-up written to the old
    /// subscription after the switch's round trip, needs a preempted
    /// nats-server goroutine and cannot be produced on demand; this shows
    /// that the old subscription is read.)
    #[tokio::test]
    async fn a_plain_subscription_given_up_for_a_shared_one_is_still_read() {
        let server = nats::NatsServer::start();
        let client = server.client().await;
        let names = Names::default();
        let queue = QueueName::default_queue();
        let mut member = client
            .queue_subscribe(names.job_wakeup_filter(&queue), names.job_wakeup_group(&queue))
            .await
            .unwrap_or_else(|e| panic!("join the group: {e}"));
        let mut wakeups = Wakeups::subscribe(client.clone(), &names, std::slice::from_ref(&queue))
            .await
            .unwrap_or_else(|e| panic!("subscribe: {e}"));
        // Long enough for a loaded machine to publish and deliver them all.
        wakeups.retire_grace = Duration::from_secs(60);
        assert!(wakeups.switch(Mode::Every, |_| {}).await);
        assert!(wakeups.switch(Mode::Shared, |_| {}).await);

        const WAKEUPS: usize = 32;
        let subjects: HashSet<String> = (0..WAKEUPS)
            .map(|i| names.job_wakeup_filter(&queue).replace('>', &format!("p2.run-{i}")))
            .collect();
        for subject in &subjects {
            client.publish(subject.clone(), "".into()).await.unwrap_or_else(|e| panic!("publish: {e}"));
        }
        client.flush().await.unwrap_or_else(|e| panic!("flush: {e}"));

        let mut seen = HashSet::new();
        while seen.len() < WAKEUPS {
            match tokio::time::timeout(Duration::from_secs(30), wakeups.next()).await {
                Ok(subject) => {
                    seen.insert(subject.to_string());
                }
                Err(_) => panic!("the worker saw {} of {WAKEUPS} wake-ups", seen.len()),
            }
        }
        assert_eq!(seen, subjects);
        // The test's member of the group got some of them too: the worker
        // did share them, and saw the rest through the plain subscription.
        let shared = tokio::time::timeout(Duration::from_secs(30), member.next()).await;
        assert!(shared.is_ok_and(|message| message.is_some()), "the group's other member got none");
    }
}
