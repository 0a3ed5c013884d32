//! Reads the upstream's root DSE: its naming contexts (the default backend
//! list) and its supported controls (a password policy makes binds writes,
//! `bind_is_write = "auto"`).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use ldap3_proto::proto::{LdapMsg, LdapOp};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::endpoint::Endpoint;
use crate::freeze::{Discover, ServerFacts};
use crate::tls::UpstreamTls;
use crate::wire::{op, pdu, Envelope, FrameCodec};
use futures::future::BoxFuture;

/// The password policy request/response control (draft-behera-ldap-password-policy):
/// listed by slapd once its ppolicy module is loaded, and by 389 DS.
pub const PASSWORD_POLICY_CONTROL: &str = "1.3.6.1.4.1.42.2.27.8.5.1";

/// What the proxy reads of the upstream's root DSE.
#[derive(Debug, Default)]
pub struct RootDse {
    /// `namingContexts` values.
    pub naming_contexts: Vec<String>,
    /// `supportedControl` values.
    pub supported_controls: Vec<String>,
}

impl RootDse {
    /// The server lists the password policy control.
    pub fn password_policy(&self) -> bool {
        self.supported_controls
            .iter()
            .any(|c| c == PASSWORD_POLICY_CONTROL)
    }
}

/// The freeze's view of the upstream: its root DSE, read anonymously on a
/// new connection within `timeout`.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) endpoint: Endpoint,
    pub(crate) tls: Option<std::sync::Arc<UpstreamTls>>,
    pub(crate) timeout: Duration,
}

impl Discover for Upstream {
    fn server_facts(&self) -> BoxFuture<'_, Result<ServerFacts, String>> {
        Box::pin(async move {
            let dse = root_dse(&self.endpoint, self.tls.as_deref(), self.timeout)
                .await
                .map_err(|e| format!("{e:#}"))?;
            Ok(ServerFacts {
                password_policy: dse.password_policy(),
                naming_contexts: dse.naming_contexts,
            })
        })
    }
}

/// The upstream's root DSE (anonymous read).
pub async fn root_dse(
    upstream: &Endpoint,
    tls: Option<&UpstreamTls>,
    timeout: Duration,
) -> anyhow::Result<RootDse> {
    tokio::time::timeout(timeout, read(upstream, tls))
        .await
        .map_err(|_| anyhow::anyhow!("timed out reading the root DSE of {upstream}"))?
}

async fn read(upstream: &Endpoint, tls: Option<&UpstreamTls>) -> anyhow::Result<RootDse> {
    let (r, w) = crate::tls::connect_upstream(upstream, tls).await?;
    let mut out = FramedWrite::new(w, FrameCodec::default());
    let mut inp = FramedRead::new(r, FrameCodec::new(16 * 1024 * 1024));
    out.send(pdu::base_search(
        1,
        "",
        &["namingContexts", "supportedControl"],
    ))
    .await?;
    let mut dse = RootDse::default();
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
                        let into = if a.atype.eq_ignore_ascii_case("namingContexts") {
                            &mut dse.naming_contexts
                        } else if a.atype.eq_ignore_ascii_case("supportedControl") {
                            &mut dse.supported_controls
                        } else {
                            continue;
                        };
                        into.extend(
                            a.vals
                                .into_iter()
                                .map(|v| String::from_utf8_lossy(&v).into_owned()),
                        );
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
    Ok(dse)
}
