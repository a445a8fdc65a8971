//! rvirtd's own protocol for pools and volumes (`rvirt pool-*`, `vol-*`):
//! the same calls libvirt's front end makes.

use rvirt_domain::protocol::{PoolSummary, Request, Response, VolumeSummary};
use rvirt_domain::ImageFormat;

use super::pools::{Pools, Result};
use super::volumes::{CREATE_PREALLOC_METADATA, RESIZE_ALLOCATE, RESIZE_DELTA, RESIZE_SHRINK};

fn answer<T>(r: Result<T>, ok: impl FnOnce(T) -> Response) -> Response {
    match r {
        Ok(v) => ok(v),
        Err(e) => Response::error(e.to_string()),
    }
}

impl Pools {
    fn summaries(&self, all: bool) -> Vec<PoolSummary> {
        self.briefs()
            .into_iter()
            .filter(|b| all || b.active)
            .map(|b| {
                let sizes = self.info(&b.name).map(|(_, s)| s).unwrap_or_default();
                PoolSummary {
                    uuid: uuid::Uuid::from_bytes(b.uuid).hyphenated().to_string(),
                    name: b.name,
                    active: b.active,
                    autostart: b.autostart,
                    persistent: b.persistent,
                    target: b.target.to_string_lossy().into_owned(),
                    capacity: sizes.capacity,
                    allocation: sizes.allocation,
                    available: sizes.available,
                }
            })
            .collect()
    }

    fn volume_summaries(&self, pool: &str) -> Result<Vec<VolumeSummary>> {
        let mut rows = Vec::new();
        for name in self.volume_names(pool)? {
            // A file removed meanwhile is left out.
            let Ok(v) = self.volume_def(pool, &name) else { continue };
            rows.push(VolumeSummary {
                path: v.path.as_deref().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default(),
                format: v.format.unwrap_or(ImageFormat::Raw).name().into(),
                capacity: v.capacity.unwrap_or(0),
                allocation: v.allocation.unwrap_or(0),
                name,
            });
        }
        Ok(rows)
    }

    /// Carries out one pool or volume request of rvirtd's own protocol.
    pub fn handle(&self, req: Request) -> Response {
        match req {
            Request::PoolList { all } => Response { pools: Some(self.summaries(all)), ..Response::ok() },
            Request::PoolDefine { xml } => answer(self.define(&xml), |b| Response::done(&b.name)),
            Request::PoolBuild { pool } => answer(self.build(&pool, 0), |n| Response::done(&n)),
            Request::PoolStart { pool, build } => answer(self.start(&pool, u32::from(build)), |n| Response::done(&n)),
            Request::PoolDestroy { pool } => answer(self.destroy(&pool), |n| Response::done(&n)),
            Request::PoolDelete { pool } => answer(self.delete(&pool), |n| Response::done(&n)),
            Request::PoolUndefine { pool } => answer(self.undefine(&pool), |n| Response::done(&n)),
            Request::PoolAutostart { pool, enable } => answer(self.set_autostart(&pool, enable), |n| Response::done(&n)),
            Request::PoolDumpXml { pool } => answer(self.dump_xml(&pool), |x| Response { xml: Some(x), ..Response::ok() }),
            Request::VolList { pool } => answer(self.volume_summaries(&pool), |v| Response { volumes: Some(v), ..Response::ok() }),
            Request::VolCreate { pool, xml, clone_of, prealloc_metadata } => {
                let flags = if prealloc_metadata { CREATE_PREALLOC_METADATA } else { 0 };
                let clone = clone_of.as_deref().map(|c| (pool.as_str(), c));
                answer(self.create_volume(&pool, &xml, flags, clone), |v| Response::done(&v.name))
            }
            Request::VolDelete { pool, volume } => answer(self.delete_volume(&pool, &volume, 0), |_| Response::done(&volume)),
            Request::VolWipe { pool, volume } => answer(self.wipe_volume(&pool, &volume), |_| Response::done(&volume)),
            Request::VolResize { pool, volume, capacity, delta, shrink, allocate } => {
                let flags = [(delta, RESIZE_DELTA), (shrink, RESIZE_SHRINK), (allocate, RESIZE_ALLOCATE)].iter().filter(|(on, _)| *on).fold(0, |f, (_, b)| f | b);
                answer(self.resize_volume(&pool, &volume, capacity, flags), |_| Response::done(&volume))
            }
            Request::VolDumpXml { pool, volume } => answer(self.volume_def(&pool, &volume), |v| Response { xml: Some(v.to_xml()), ..Response::ok() }),
            other => Response::error(format!("'{}' is not a storage request", other.name())),
        }
    }
}
