//! Reads the upstream's naming contexts from its root DSE (the default
//! backend list).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use ldap3_proto::proto::{
    LdapDerefAliases, LdapFilter, LdapMsg, LdapOp, LdapSearchRequest, LdapSearchScope,
};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::endpoint::Endpoint;
use crate::tls::UpstreamTls;
use crate::wire::{op, pdu, Envelope, FrameCodec};

/// The `namingContexts` values of the upstream's root DSE (anonymous read).
pub async fn naming_contexts(
    upstream: &Endpoint,
    tls: Option<&UpstreamTls>,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    tokio::time::timeout(timeout, read(upstream, tls))
        .await
        .map_err(|_| anyhow::anyhow!("timed out reading the root DSE of {upstream}"))?
}

async fn read(upstream: &Endpoint, tls: Option<&UpstreamTls>) -> anyhow::Result<Vec<String>> {
    let (r, w) = crate::tls::connect_upstream(upstream, tls).await?;
    let mut out = FramedWrite::new(w, FrameCodec::default());
    let mut inp = FramedRead::new(r, FrameCodec::new(16 * 1024 * 1024));
    let req = LdapMsg::new(
        1,
        LdapOp::SearchRequest(LdapSearchRequest {
            base: String::new(),
            scope: LdapSearchScope::Base,
            aliases: LdapDerefAliases::Never,
            sizelimit: 0,
            timelimit: 0,
            typesonly: false,
            filter: LdapFilter::Present("objectClass".into()),
            attrs: vec!["namingContexts".into()],
        }),
    );
    out.send(pdu::encode(req)).await?;
    let mut contexts = Vec::new();
    while let Some(frame) = inp.next().await {
        let frame = frame?;
        let env = Envelope::response(&frame)?;
        if env.msgid != 1 {
            continue;
        }
        match env.op {
            op::SEARCH_RESULT_ENTRY => {
                use tokio_util::codec::Decoder;
                let mut buf = bytes::BytesMut::from(&frame[..]);
                let msg = ldap3_proto::LdapCodec::new(Some(16 * 1024 * 1024), None)
                    .decode(&mut buf)?
                    .ok_or_else(|| anyhow::anyhow!("incomplete root DSE entry"))?;
                if let LdapOp::SearchResultEntry(e) = msg.op {
                    for a in e.attributes {
                        if a.atype.eq_ignore_ascii_case("namingContexts") {
                            contexts.extend(
                                a.vals
                                    .into_iter()
                                    .map(|v| String::from_utf8_lossy(&v).into_owned()),
                            );
                        }
                    }
                }
            }
            op::SEARCH_RESULT_DONE => {
                if env.result_code != Some(0) {
                    anyhow::bail!("root DSE search failed with result {:?}", env.result_code);
                }
                break;
            }
            _ => {}
        }
    }
    let _ = out
        .send(pdu::encode(LdapMsg::new(2, LdapOp::UnbindRequest)))
        .await;
    Ok(contexts)
}
