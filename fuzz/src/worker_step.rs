//! What a worker decodes from its coordinator (`yoco.worker.v1.StepRequest` →
//! `service::convert::plan_from_pb`) and what the coordinator decodes from its workers
//! (`StepResponse` results → `convert::result_from_pb`). A plan that is accepted must survive
//! the trip back to the wire and in again unchanged.

use prost::Message;
use yoco_proto::worker::v1 as pb;
use yoco_worker::service::convert;

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        step_request(rest);
    } else {
        step_response(rest);
    }
}

fn step_request(bytes: &[u8]) {
    let Ok(req) = pb::StepRequest::decode(bytes) else { return };
    let plan = match convert::plan_from_pb(&req) {
        Ok(plan) => plan,
        Err(reason) => {
            assert!(!reason.is_empty());
            return;
        }
    };
    for s in &plan.add {
        assert_eq!(s.sampling.validate(), Ok(()));
        assert!(s.top_logprobs <= convert::MAX_TOP_LOGPROBS as usize);
    }
    let wire = convert::plan_to_pb(req.step_id, &plan);
    let again = convert::plan_from_pb(&wire).expect("a plan that was accepted is accepted again");
    assert_eq!(format!("{again:?}"), format!("{plan:?}"));
    // And through the bytes the coordinator actually sends.
    let decoded = pb::StepRequest::decode(wire.encode_to_vec().as_slice()).expect("own encoding");
    assert_eq!(decoded, wire);
}

fn step_response(bytes: &[u8]) {
    let Ok(resp) = pb::StepResponse::decode(bytes) else { return };
    for r in &resp.results {
        let result = convert::result_from_pb(r);
        let back = convert::result_to_pb(&result);
        assert_eq!(format!("{:?}", convert::result_from_pb(&back)), format!("{result:?}"));
    }
}
