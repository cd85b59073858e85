//! The thread that starts this process's VMs.
//!
//! Linux keeps a nice value per thread and a new thread inherits its creator's. The backup's
//! replication work (receiving, decoding and applying epochs) can run below normal priority
//! (`understudy backup --nice N`), so that on a host that also runs VMs it takes the CPU only
//! when they leave it: on our 2-core bench host, the backup's threads at nice 0 preempted the
//! source guest's vCPU for 16-23 ms at a time during a move's full sync, against 5-9 ms at 10. A VM this backup starts (a promotion, a postcopy destination) must not
//! inherit that priority, and raising a thread's priority again needs CAP_SYS_NICE. So its
//! vCPU threads are started from this thread, made before the process lowered its priority,
//! and so are two threads whose lag costs more than their CPU: the postcopy fault thread (a
//! guest waits on each answer) and the persist writer (the image on disk would trail the hot
//! one: a CI run at nice 10 kept a backup's disk image at epoch 1 after 1.5 s of protection).
//! Without `--nice` the thread changes nothing.

use std::sync::mpsc;
use std::sync::Mutex;

type Job = Box<dyn FnOnce() + Send>;

/// A thread at the process's original priority that runs the jobs that start VMs.
pub struct VmThread {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl VmThread {
    /// Starts the thread; call it before lowering the process's priority.
    pub fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("vm-start".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })?;
        Ok(VmThread {
            jobs: Mutex::new(tx),
        })
    }

    /// Starts a thread named `name` running `f` from this thread, so that it keeps the
    /// original priority too; returns once it is started.
    pub fn spawn_thread(
        &self,
        name: &str,
        f: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let (tx, rx) = mpsc::channel();
        let name = name.to_string();
        let job: Job = Box::new(move || {
            let r = std::thread::Builder::new().name(name).spawn(f).map(drop);
            let _ = tx.send(r);
        });
        let ended = || std::io::Error::other("the VM start thread has ended");
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .map_err(|_| ended())?;
        rx.recv().map_err(|_| ended())?
    }

    /// Runs `f` on the thread and returns its result.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .map_err(|_| "the VM start thread has ended".to_string())?;
        rx.await
            .map_err(|_| "the VM start thread dropped the job".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's nice value (field 19 of /proc/thread-self/stat).
    fn nice_here() -> i64 {
        let s = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let after = &s[s.rfind(')').unwrap() + 2..];
        after.split(' ').nth(16).unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn vm_threads_keep_the_priority_the_process_started_with() {
        let base = nice_here();
        let t = VmThread::start().unwrap();
        let lowered = (base + 3).min(19);
        understudy_vmm::set_thread_nice(lowered as i32).unwrap();
        let inherited = std::thread::spawn(nice_here).join().unwrap();
        assert_eq!(
            inherited, lowered,
            "a thread inherits its creator's nice value"
        );
        let (name, vcpu_like) = t
            .run(|| {
                let name = std::thread::current().name().map(str::to_string);
                (name, std::thread::spawn(nice_here).join().unwrap())
            })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("vm-start"));
        assert_eq!(
            vcpu_like, base,
            "threads started by a VM job keep the original priority"
        );
    }
}
