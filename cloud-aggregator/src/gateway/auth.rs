//! Agent authentication by per-agent credential.
//!
//! The gateway stores only the SHA-256 of each agent's credential and compares in constant
//! time. The identity (agent id, tenant) comes from the gateway's own table, never from what
//! the agent claims beyond its id. Certificates per agent replace this in the security work.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::config::AgentEntry;

/// The agents allowed in.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    agents: HashMap<String, (String, [u8; 32])>,
}

/// Why an agent was refused. The message never contains the credential.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("unknown agent {0:?}")]
    UnknownAgent(String),
    #[error("wrong credential for agent {0:?}")]
    WrongCredential(String),
}

impl Authenticator {
    pub fn new(entries: &[AgentEntry]) -> Authenticator {
        let agents = entries
            .iter()
            .filter_map(|e| {
                let digest: [u8; 32] = hex::decode(&e.credential_sha256).ok()?.try_into().ok()?;
                Some((e.id.clone(), (e.tenant.clone(), digest)))
            })
            .collect();
        Authenticator { agents }
    }

    /// Returns the agent's tenant if the credential is right.
    pub fn check(&self, agent_id: &str, credential: &str) -> Result<String, AuthError> {
        let (tenant, expected) =
            self.agents.get(agent_id).ok_or_else(|| AuthError::UnknownAgent(agent_id.to_owned()))?;
        let actual: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
        let diff = expected.iter().zip(actual.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 { Ok(tenant.clone()) } else { Err(AuthError::WrongCredential(agent_id.to_owned())) }
    }
}

/// The hex SHA-256 of a credential, as the gateway's configuration stores it.
pub fn credential_sha256(credential: &str) -> String {
    hex::encode(Sha256::digest(credential.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_credentials_without_echoing_them() {
        let auth = Authenticator::new(&[AgentEntry {
            id: "a1".into(),
            tenant: "acme".into(),
            credential_sha256: credential_sha256("right"),
        }]);
        assert_eq!(auth.check("a1", "right"), Ok("acme".into()));
        let err = auth.check("a1", "wrong").unwrap_err();
        assert_eq!(err, AuthError::WrongCredential("a1".into()));
        assert!(!err.to_string().contains("wrong\""));
        assert_eq!(auth.check("a2", "right"), Err(AuthError::UnknownAgent("a2".into())));
    }
}
