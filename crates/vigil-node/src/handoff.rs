//! The wake-up handoff between a producer (the sequencer) and a parked consumer (a shard thread).
//!
//! The consumer announces it is going to sleep, fences, re-checks its queue and only then parks; the producer
//! publishes work, fences, and unparks if the consumer announced sleep. With both fences sequentially consistent,
//! at least one side sees the other: either the consumer finds the work, or the producer finds `sleeping` and
//! unparks (and an unpark before the park makes the park return at once). The loom test below checks that no
//! interleaving loses a wake-up.

use crate::sync::{AtomicBool, Ordering, fence};

#[derive(Debug, Default)]
pub struct Parker {
    sleeping: AtomicBool,
}

impl Parker {
    pub fn new() -> Self {
        Self { sleeping: AtomicBool::new(false) }
    }

    /// Consumer side: parks (through `park`) unless `has_work` finds work after sleep was announced.
    pub fn sleep_unless(&self, has_work: impl Fn() -> bool, park: impl FnOnce()) {
        self.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if !has_work() {
            park();
        }
        self.sleeping.store(false, Ordering::SeqCst);
    }

    /// Producer side, after the work is published: unparks (through `unpark`) if the consumer may be asleep.
    pub fn wake(&self, unpark: impl FnOnce()) {
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            unpark();
        }
    }
}

#[cfg(all(test, vigil_loom))]
mod loom_tests {
    use super::Parker;
    use crate::sync::{AtomicUsize, Ordering, thread};
    use loom::sync::Arc;

    /// A model of the SPSC ring's indices: the producer publishes `tail` with Release, the consumer reads it with
    /// Acquire, as rtrb does.
    #[test]
    fn no_wakeup_is_lost() {
        // Proves, over every interleaving loom explores, that the consumer never sleeps through published work.
        loom::model(|| {
            const ITEMS: usize = 2;
            let tail = Arc::new(AtomicUsize::new(0));
            let parker = Arc::new(Parker::new());
            let consumer = {
                let (tail, parker) = (Arc::clone(&tail), Arc::clone(&parker));
                thread::spawn(move || {
                    let mut head = 0;
                    while head < ITEMS {
                        if tail.load(Ordering::Acquire) > head {
                            head += 1;
                        } else {
                            parker.sleep_unless(|| tail.load(Ordering::Acquire) > head, thread::park);
                        }
                    }
                })
            };
            let consumer_thread = consumer.thread().clone();
            for i in 1..=ITEMS {
                tail.store(i, Ordering::Release);
                parker.wake(|| consumer_thread.unpark());
            }
            consumer.join().expect("consumer finished");
        });
    }
}
