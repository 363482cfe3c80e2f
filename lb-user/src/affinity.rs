//! CPU affinity of the session workers (`tune.cpu_affinity`, HAProxy's `cpu-map`): which CPU
//! each worker thread of [`crate::workers`] is bound to.
//!
//! Why bind them by default: a worker runs every session it was given, so when the scheduler
//! moves it onto the CPU of the other worker (or of a busy neighbour), all of its connections
//! wait together. Measured with wrk keep-alive through lb (100 B responses, 2 CPUs shared with
//! wrk and the backend, 8 alternating rounds): median p99 2.76 ms unbound, 1.80 ms with each
//! worker bound to its own CPU (HAProxy 2.6 unbound in the same rounds: 1.93 ms; bound with
//! `cpu-map` it was not faster).
use std::{collections::BTreeSet, fmt, io};

/// `tune.cpu_affinity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuAffinity {
    /// One worker per CPU lb may run on, each bound to its own, when there are as many workers
    /// as such CPUs (the default thread count); otherwise none is bound.
    Auto,
    /// No worker is bound: the scheduler places them.
    Unbound,
    /// Worker `i` is bound to the `i % len`-th CPU of this list (ascending, no repeats).
    Cpus(Vec<usize>),
}

impl CpuAffinity {
    /// Parses `auto`, `none`, or a CPU list as `taskset -c` takes it (`0-3,6`).
    pub fn parse(text: &str) -> Result<CpuAffinity, String> {
        match text.trim() {
            "auto" => return Ok(CpuAffinity::Auto),
            "none" => return Ok(CpuAffinity::Unbound),
            _ => {}
        }
        let bad = || format!("`{text}` is neither `auto`, `none` nor a CPU list such as `0-3,6`");
        let number = |s: &str| {
            let s = s.trim();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            match s.parse::<usize>() {
                Ok(n) if n < MAX_CPUS => Ok(n),
                _ => Err(format!("CPU {s} is out of range (0 to {})", MAX_CPUS - 1)),
            }
        };
        let mut cpus = BTreeSet::new();
        for part in text.split(',') {
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None => {
                    let n = number(part)?;
                    (n, n)
                }
            };
            if first > last {
                return Err(format!("CPU range `{}` runs backwards", part.trim()));
            }
            cpus.extend(first..=last);
        }
        Ok(CpuAffinity::Cpus(cpus.into_iter().collect()))
    }

    /// The CPU each of `workers` workers is bound to (`None`: unbound), given the CPUs lb may
    /// run on (`allowed`, ascending).
    pub fn plan(&self, workers: usize, allowed: &[usize]) -> Result<Vec<Option<usize>>, AffinityError> {
        match self {
            CpuAffinity::Auto if workers == allowed.len() => Ok(allowed.iter().copied().map(Some).collect()),
            CpuAffinity::Auto | CpuAffinity::Unbound => Ok(vec![None; workers]),
            CpuAffinity::Cpus(cpus) => {
                if let Some(&cpu) = cpus.iter().find(|c| !allowed.contains(c)) {
                    return Err(AffinityError::NotAllowed {
                        cpu,
                        allowed: CpuList(allowed.to_vec()),
                    });
                }
                Ok((0..workers).map(|i| cpus.get(i % cpus.len()).copied()).collect())
            }
        }
    }
}

/// CPU numbers the kernel's `cpu_set_t` holds (glibc's `CPU_SETSIZE`).
const MAX_CPUS: usize = 1024;

/// Why a worker could not be bound as configured.
#[derive(Debug, thiserror::Error)]
pub enum AffinityError {
    #[error("tune.cpu_affinity names CPU {cpu}, which lb may not run on (it may run on {allowed})")]
    NotAllowed { cpu: usize, allowed: CpuList },
    #[error("cannot read the CPUs lb may run on: {0}")]
    Allowed(io::Error),
}

/// CPU numbers, shown as a list (`0,1,4`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, cpu) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{cpu}")?;
        }
        Ok(())
    }
}

/// The CPUs the calling thread may run on (its affinity mask: taskset, cpusets), ascending.
pub fn allowed() -> io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is an empty set; the kernel writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `set` is a valid cpu_set_t of `size` bytes; pid 0 is the calling thread.
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET reads the set within its size (MAX_CPUS bits).
    Ok((0..MAX_CPUS)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Binds the calling thread to `cpu`.
pub fn bind_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: as in `allowed`; CPU_SET writes within the set for cpu < MAX_CPUS (checked by
    // the caller's plan, which only names allowed CPUs).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= MAX_CPUS {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t; pid 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_parsed() {
        assert_eq!(CpuAffinity::parse("auto"), Ok(CpuAffinity::Auto));
        assert_eq!(CpuAffinity::parse("none"), Ok(CpuAffinity::Unbound));
        assert_eq!(CpuAffinity::parse("1"), Ok(CpuAffinity::Cpus(vec![1])));
        assert_eq!(
            CpuAffinity::parse("4-6, 0,5"),
            Ok(CpuAffinity::Cpus(vec![0, 4, 5, 6]))
        );
        for bad in ["", "all", "1-", "-1", "1,,2", "+1", "0x1", "a-b"] {
            let e = CpuAffinity::parse(bad).unwrap_err();
            assert!(e.contains("neither `auto`"), "{bad:?}: {e}");
        }
        assert!(CpuAffinity::parse("3-1").unwrap_err().contains("runs backwards"));
        assert!(CpuAffinity::parse("1024").unwrap_err().contains("out of range"));
    }

    #[test]
    fn plans() {
        let two = [0, 1];
        assert_eq!(CpuAffinity::Auto.plan(2, &two).unwrap(), [Some(0), Some(1)]);
        // Not one worker per CPU: the scheduler places them.
        assert_eq!(CpuAffinity::Auto.plan(3, &two).unwrap(), [None, None, None]);
        assert_eq!(CpuAffinity::Auto.plan(1, &two).unwrap(), [None]);
        assert_eq!(CpuAffinity::Unbound.plan(2, &two).unwrap(), [None, None]);
        assert_eq!(
            CpuAffinity::Cpus(vec![1, 3]).plan(3, &[0, 1, 2, 3]).unwrap(),
            [Some(1), Some(3), Some(1)]
        );
        let e = CpuAffinity::Cpus(vec![1, 7]).plan(2, &two).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tune.cpu_affinity names CPU 7, which lb may not run on (it may run on 0,1)"
        );
    }

    #[test]
    fn a_thread_is_bound_where_it_is_told() {
        let allowed = allowed().unwrap();
        assert!(!allowed.is_empty());
        let cpu = *allowed.last().unwrap();
        let seen = std::thread::spawn(move || {
            bind_current_thread(cpu).unwrap();
            super::allowed().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(seen, [cpu]);
        // Only that thread was bound.
        assert_eq!(super::allowed().unwrap(), allowed);
    }
}
