//! The all-reduce of a tensor-parallel group on CUDA GPUs: NCCL, through the cudarc that candle
//! re-exports (feature `cuda`).
//!
//! Rank 0 makes the group's id with [`unique_id`] and the caller ships it to the other ranks;
//! each rank joins with [`NcclCollective::init`] on whatever GPU its worker runs on.
//!
//! No wait is unbounded. The communicator is NCCL's non-blocking kind, so joining returns at
//! once and is then polled; an all-reduce is enqueued on the device's stream (ordered with
//! candle's kernels) and polled until the GPU has finished it. Either wait ends at the group's
//! timeout. A timeout or an error NCCL reports (a peer gone, a network failure) aborts the
//! communicator, which also stops its kernels on the GPU, and breaks the group for good: every
//! later call fails at once with the first reason, as the TCP group does. The price is one
//! host–device synchronisation per all-reduce.

use super::Collective;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::cudarc::nccl::result::{self, NcclStatus};
use candle_core::cuda_backend::cudarc::nccl::safe::{Id, NcclType};
use candle_core::cuda_backend::cudarc::nccl::sys;
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use half::{bf16, f16};
use std::cell::RefCell;
use std::ffi::{c_char, c_void};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Length in bytes of a group id (NCCL's unique id).
pub const ID_BYTES: usize = 128;

/// A new group id. Rank 0 makes it; every rank of the group passes the same bytes to
/// [`NcclCollective::init`]. Needs NCCL, not a GPU.
pub fn unique_id() -> crate::Result<Vec<u8>> {
    let id = Id::new().map_err(|e| error(format!("creating a group id: {}", describe(e.0))))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// Tells a group's all-reduces to give up, from any thread: a peer is known to be gone (its
/// control link closed), so waiting for the timeout would only delay the failure.
#[derive(Debug, Clone, Default)]
pub struct Stop(std::sync::Arc<Mutex<Option<String>>>);

impl Stop {
    /// Makes the running all-reduce (if any) and every later one fail with `why`.
    pub fn stop(&self, why: String) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why);
    }

    fn reason(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One rank of a tensor-parallel group whose all-reduce runs on NCCL.
pub struct NcclCollective {
    rank: usize,
    size: usize,
    timeout: Duration,
    stop: Stop,
    device: CudaDevice,
    state: Mutex<State>,
}

struct State {
    /// `None` once aborted.
    comm: Option<Comm>,
    /// Recorded after each all-reduce; its completion is the all-reduce's.
    done: CudaEvent,
    /// Why the group is broken, if it is.
    broken: Option<String>,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("timeout", &self.timeout)
            // try_lock: formatting must not deadlock inside an all-reduce of this group.
            .field("broken", &self.state.try_lock().ok().map(|s| s.broken.clone()))
            .finish_non_exhaustive()
    }
}

impl NcclCollective {
    /// Joins the group `id` as `rank` of `size`, on `device` (any CUDA device: the rank is not
    /// the GPU's index). Returns once every rank has joined; fails if that takes longer than
    /// `timeout`, which also bounds every later all-reduce.
    pub fn init(device: &Device, rank: usize, size: usize, id: &[u8], timeout: Duration) -> crate::Result<Self> {
        let fail = |m: String| error(format!("rank {rank} of {size}: {m}"));
        let Device::Cuda(dev) = device else {
            return Err(fail(format!("NCCL needs a CUDA device, not {device:?}")));
        };
        if rank >= size || i32::try_from(size).is_err() {
            return Err(fail("no such rank".into()));
        }
        let internal: [c_char; ID_BYTES] = id
            .iter()
            .map(|&b| b as c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| fail(format!("a group id has {ID_BYTES} bytes, not {}", id.len())))?;
        let stream = dev.cuda_stream();
        // NCCL takes the GPU of the calling thread's current context.
        stream.context().bind_to_thread().map_err(|e| fail(format!("selecting the GPU: {e}")))?;
        let done = stream.context().new_event(None).map_err(|e| fail(format!("creating an event: {e}")))?;

        let mut config = nonblocking_config();
        let mut raw: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `raw` and `config` outlive the call; NCCL copies the config and writes the
        // handle. The size and rank fit an i32 (checked above).
        #[allow(unsafe_code)]
        let started =
            unsafe { result::comm_init_rank_config(&mut raw, size as i32, sys::ncclUniqueId { internal }, rank as i32, &mut config) };
        // From here on, any return aborts (and frees) the communicator through `Comm`'s drop.
        let comm = (!raw.is_null()).then_some(Comm(raw));
        if let Err(e) = started {
            return Err(fail(format!("joining the group: {}", describe(e.0))));
        }
        let comm = comm.ok_or_else(|| fail("NCCL returned no communicator".into()))?;
        wait_until(Instant::now() + timeout, || comm.settled()).map_err(|e| match e {
            Wait::Failed(m) => fail(format!("joining the group: {m}")),
            Wait::TimedOut => fail(format!("the group did not form within {timeout:?}: is every rank up, with the same id?")),
        })?;
        Ok(NcclCollective {
            rank,
            size,
            timeout,
            stop: Stop::default(),
            device: dev.clone(),
            state: Mutex::new(State { comm: Some(comm), done, broken: None }),
        })
    }

    /// A handle that makes this rank's all-reduces fail at once.
    pub fn stopper(&self) -> Stop {
        self.stop.clone()
    }

    /// Why the group is broken, if it is.
    pub fn broken(&self) -> Option<String> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).broken.clone()
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn kind(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        // A poisoned lock only means an earlier call panicked; the state is written in one
        // place, after the communicator is aborted, so it is consistent either way.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &state.broken {
            return Err(candle_core::Error::Msg(format!("the NCCL group is broken: {why}")));
        }
        let op = AllReduce { group: self, state: RefCell::new(&mut state) };
        t.contiguous()?.apply_op1_no_bwd(&op)
    }
}

/// The all-reduce as a candle op, so that it reaches the tensor's CUDA storage.
struct AllReduce<'a, 'b> {
    group: &'a NcclCollective,
    state: RefCell<&'a mut std::sync::MutexGuard<'b, State>>,
}

impl CustomOp1 for AllReduce<'_, '_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(candle_core::Error::Msg("the NCCL all-reduce needs a CUDA tensor".into()))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            return Err(candle_core::Error::Msg("the all-reduce input is not contiguous".into()));
        };
        if s.device.id() != self.group.device.id() {
            return Err(candle_core::Error::Msg("the tensor is on another GPU than the NCCL group".into()));
        }
        let out = match s.dtype() {
            DType::F32 => self.reduce::<f32>(s, start, end)?,
            DType::BF16 => self.reduce::<bf16>(s, start, end)?,
            DType::F16 => self.reduce::<f16>(s, start, end)?,
            other => {
                return Err(candle_core::Error::Msg(format!("the NCCL all-reduce does not take {other:?}")));
            }
        };
        Ok((out, l.shape().clone()))
    }
}

impl AllReduce<'_, '_> {
    fn reduce<T>(&self, s: &CudaStorage, start: usize, end: usize) -> candle_core::Result<CudaStorage>
    where
        T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits,
    {
        let src = s.as_cuda_slice::<T>()?;
        let Some(src) = src.try_slice(start..end) else {
            return Err(candle_core::Error::Msg("the all-reduce input is outside its storage".into()));
        };
        let mut dst = s.device.alloc_zeros::<T>(end - start)?;
        let stream = s.device.cuda_stream();
        let mut state = self.state.borrow_mut();
        let outcome = self.launch_and_wait::<T>(&mut state, &stream, &src, &mut dst);
        if let Err(why) = outcome {
            // Abort before `dst` is freed: a kernel NCCL left waiting for a peer would otherwise
            // still be writing into it, and freeing may wait for that kernel forever.
            state.comm = None;
            state.broken = Some(why.clone());
            let (rank, size) = (self.group.rank, self.group.size);
            tracing::error!(rank, size, error = %why, "NCCL all-reduce failed; the group is broken");
            return Err(candle_core::Error::Msg(format!("NCCL all-reduce, rank {rank} of {size}: {why}")));
        }
        Ok(CudaStorage::wrap_cuda_slice(dst, s.device.clone()))
    }

    /// Enqueues the all-reduce of `src` into `dst` and waits, bounded, until the GPU is done.
    fn launch_and_wait<T: NcclType>(
        &self,
        state: &mut State,
        stream: &CudaStream,
        src: &impl DevicePtr<T>,
        dst: &mut impl DevicePtrMut<T>,
    ) -> Result<(), String> {
        let group = self.group;
        let comm = state.comm.as_ref().ok_or("the communicator is gone")?;
        if let Some(why) = group.stop.reason() {
            return Err(why);
        }
        let deadline = Instant::now() + group.timeout;
        let stopped = || group.stop.reason().map_or(Ok(()), Err);
        stream.context().bind_to_thread().map_err(|e| format!("selecting the GPU: {e}"))?;
        let len = src.len();
        {
            let (src_ptr, _src_use) = src.device_ptr(stream);
            let (dst_ptr, _dst_use) = dst.device_ptr_mut(stream);
            // SAFETY: both pointers address `len` elements of T on the group's GPU, valid for
            // the whole collective: `src` is borrowed from the input tensor and `dst` is owned by
            // the caller, which aborts the communicator (stopping the kernel) before freeing it
            // on failure. The stream belongs to the same context as the communicator's GPU.
            #[allow(unsafe_code)]
            let enqueued = unsafe {
                result::all_reduce(
                    src_ptr as *const c_void,
                    dst_ptr as *mut c_void,
                    len,
                    T::as_nccl_type(),
                    sys::ncclRedOp_t::ncclSum,
                    comm.0,
                    stream.cu_stream() as sys::cudaStream_t,
                )
            };
            enqueued.map_err(|e| describe(e.0))?;
        }
        let timed_out = |what: &str| format!("{what} within {:?}: a peer is gone or stalled", group.timeout);
        // A non-blocking communicator may still be enqueuing (connecting, on a first call); the
        // kernel is on the stream only once it settles, so only then does the event mean anything.
        wait_until(deadline, || {
            stopped()?;
            comm.settled()
        })
        .map_err(|e| match e {
            Wait::Failed(m) => m,
            Wait::TimedOut => timed_out("the all-reduce was not launched"),
        })?;
        state.done.record(stream).map_err(|e| format!("recording an event: {e}"))?;
        let done = &state.done;
        wait_until(deadline, || {
            stopped()?;
            if done.try_is_complete().map_err(|e| format!("waiting for the all-reduce: {e}"))? {
                return Ok(true);
            }
            comm.settled().map(|_| false)
        })
        .map_err(|e| match e {
            Wait::Failed(m) => m,
            Wait::TimedOut => timed_out("the all-reduce did not finish"),
        })
    }
}

/// An NCCL communicator, aborted (which frees it) when dropped.
struct Comm(sys::ncclComm_t);

// SAFETY: a communicator may be used from any thread as long as calls on it do not overlap;
// `NcclCollective` only touches it under its mutex.
#[allow(unsafe_code)]
unsafe impl Send for Comm {}

impl Comm {
    /// Whether the communicator's pending work (joining, or enqueuing a collective) is done;
    /// an error once NCCL has seen one (a peer gone, a network failure).
    fn settled(&self) -> Result<bool, String> {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `self.0` is a live communicator (only drop releases it) and `state` outlives
        // the call.
        #[allow(unsafe_code)]
        let asked = unsafe { sys::ncclCommGetAsyncError(self.0, &mut state) };
        asked.result().map_err(|e| describe(e.0))?;
        match state.result() {
            Ok(NcclStatus::InProgress) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) => Err(describe(e.0)),
        }
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        // Abort, not destroy: destroying waits for pending work, which never ends when a peer is
        // gone; aborting stops it. Other ranks see their next all-reduce fail.
        // SAFETY: `self.0` is live and never used after this.
        #[allow(unsafe_code)]
        let aborted = unsafe { result::comm_abort(self.0) };
        if let Err(e) = aborted {
            tracing::warn!(error = %describe(e.0), "aborting an NCCL communicator failed");
        }
    }
}

/// NCCL's `NCCL_CONFIG_INITIALIZER` with `blocking = 0`. The version is that of the layout
/// cudarc binds (2.30); NCCL copies `size` bytes and gives fields newer than `version` their
/// defaults, so an older or newer libnccl at run time reads it correctly.
fn nonblocking_config() -> sys::ncclConfig_t {
    const UNDEF_INT: i32 = i32::MIN;
    let undef_ptr = std::ptr::null();
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 2 * 10000 + 30 * 100,
        blocking: 0,
        cgaClusterSize: UNDEF_INT,
        minCTAs: UNDEF_INT,
        maxCTAs: UNDEF_INT,
        netName: undef_ptr,
        splitShare: UNDEF_INT,
        trafficClass: UNDEF_INT,
        commName: undef_ptr,
        collnetEnable: UNDEF_INT,
        CTAPolicy: UNDEF_INT,
        shrinkShare: UNDEF_INT,
        nvlsCTAs: UNDEF_INT,
        nChannelsPerNetPeer: UNDEF_INT,
        nvlinkCentricSched: UNDEF_INT,
        graphUsageMode: UNDEF_INT,
        numRmaCtx: UNDEF_INT,
        maxP2pPeers: UNDEF_INT,
    }
}

enum Wait {
    Failed(String),
    TimedOut,
}

/// Polls `ready` until it says yes, fails, or `deadline` passes.
fn wait_until(deadline: Instant, mut ready: impl FnMut() -> Result<bool, String>) -> Result<(), Wait> {
    let mut polls = 0u32;
    loop {
        if ready().map_err(Wait::Failed)? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Wait::TimedOut);
        }
        // A decode step's all-reduce takes microseconds: yield at first, sleep once it is slow.
        polls += 1;
        if polls < 2000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn describe(r: sys::ncclResult_t) -> String {
    use sys::ncclResult_t as R;
    match r {
        R::ncclUnhandledCudaError => "a CUDA call failed inside NCCL".into(),
        R::ncclSystemError => "a system call failed inside NCCL (network, shared memory)".into(),
        R::ncclInternalError => "NCCL internal error".into(),
        R::ncclInvalidArgument => "NCCL rejected an argument".into(),
        R::ncclInvalidUsage => "NCCL rejected the call (invalid usage)".into(),
        R::ncclRemoteError => "a peer failed or went away".into(),
        R::ncclTimeout => "NCCL timed out".into(),
        other => format!("NCCL error {other:?}"),
    }
}

fn error(message: String) -> crate::Error {
    crate::Error::config("nccl", message)
}

// What runs without a GPU is argument checking and the group id; the rest is `#[ignore]`d here
// and run on a GPU machine with `-- --ignored` (scripts/build-cuda.sh builds the test binary
// with `cargo test --no-run` in its environment).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_device_is_refused() {
        let e = NcclCollective::init(&Device::Cpu, 0, 1, &[0; ID_BYTES], Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("needs a CUDA device"), "{e}");
    }

    #[test]
    fn the_config_is_the_layout_nccl_expects() {
        let c = nonblocking_config();
        assert_eq!(c.size, std::mem::size_of::<sys::ncclConfig_t>());
        assert_eq!((c.magic, c.blocking), (0xcafe_beef, 0));
    }

    #[test]
    fn group_ids_are_fresh() {
        let (a, b) = (unique_id().unwrap(), unique_id().unwrap());
        assert_eq!((a.len(), b.len()), (ID_BYTES, ID_BYTES));
        assert_ne!(a, b);
    }

    fn gpu() -> Device {
        Device::new_cuda(0).expect("this test needs a CUDA GPU")
    }

    #[test]
    #[ignore = "needs a GPU"]
    fn one_rank_sums_to_itself_in_every_dtype() {
        let dev = gpu();
        let g = NcclCollective::init(&dev, 0, 1, &unique_id().unwrap(), Duration::from_secs(30)).unwrap();
        let x = Tensor::arange(0f32, 24.0, &dev).unwrap().reshape((4, 6)).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = x.to_dtype(dtype).unwrap();
            let y = g.all_reduce_sum(&x).unwrap();
            assert_eq!(y.dtype(), dtype);
            assert_eq!(
                y.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
                x.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
            );
        }
        // A view at an offset, and a transposed (non-contiguous) one.
        let rows = x.narrow(0, 1, 2).unwrap();
        assert_eq!(g.all_reduce_sum(&rows).unwrap().to_vec2::<f32>().unwrap(), rows.to_vec2::<f32>().unwrap());
        let t = x.t().unwrap();
        assert_eq!(g.all_reduce_sum(&t).unwrap().to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        assert!(g.broken().is_none());
    }

    #[test]
    #[ignore = "needs a GPU"]
    fn a_rank_that_never_joins_times_out_instead_of_hanging() {
        let start = Instant::now();
        let e = NcclCollective::init(&gpu(), 0, 2, &unique_id().unwrap(), Duration::from_secs(3)).unwrap_err();
        assert!(e.to_string().contains("did not form within 3s"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(20), "took {:?}", start.elapsed());
    }
}
