//! Creating what a target lacks, through its cloud's own management API: a namespace (TCR,
//! SWR, Harbor) or a repository (ECR), when the registry refuses a write for want of it.
//!
//! Only what the API says is absent is created, private, with the configured settings; an
//! existing namespace or repository is never changed. Each provider has its module (its
//! signing scheme, its calls, its errors); `api` holds the bounded HTTP call they share. The
//! callers (the mirror's workers, `regtee check`, a dry-run sync) decide when to ask.

mod api;
mod aws_credentials;
mod ecr;
mod harbor;
mod swr;
mod tcr;

use std::time::{Duration, Instant};

use dashmap::DashMap;

pub(crate) use api::{ApiError, ApiErrorKind};

use crate::config::{ApiKeys, CreateConfig, CreateMissing, Provider, TargetConfig};
use api::ApiClient;

/// How long what the API last said of a namespace or repository stays known: that it exists
/// (regtee created or found it), or that regtee's key may not make it. The workers that waited
/// for that answer then skip the API, instead of each asking to be refused again.
const KNOWN_FOR: Duration = Duration::from_secs(10);

/// A namespace or repository on a target, under the target's names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Creation {
    Namespace(String),
    Repository(String),
}

impl std::fmt::Display for Creation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Creation::Namespace(n) => write!(f, "namespace {n}"),
            Creation::Repository(r) => write!(f, "repository {r}"),
        }
    }
}

/// What [`Provisioner::ensure`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ensured {
    /// regtee created it now.
    Created,
    /// It was there already.
    Existed,
}

/// One provider's API.
enum Api {
    Tcr(tcr::Tcr),
    Swr(swr::Swr),
    Ecr(ecr::Ecr),
    Harbor(harbor::Harbor),
}

/// Creates what one target lacks.
pub(crate) struct Provisioner {
    what: CreateMissing,
    provider: Provider,
    api: Api,
    /// Recently created or seen (`None`), or refused for good (the refusal), with when.
    known: DashMap<Creation, (Instant, Option<ApiError>)>,
}

impl Provisioner {
    /// The target's provisioner, when it has `create_missing`.
    pub(crate) fn of(target: &TargetConfig) -> Result<Option<Provisioner>, crate::tls::TlsError> {
        let Some(config) = &target.create else {
            return Ok(None);
        };
        Ok(Some(Provisioner::new(config)?))
    }

    fn new(c: &CreateConfig) -> Result<Provisioner, crate::tls::TlsError> {
        let client = ApiClient::new(c.provider, c.api.clone(), &c.api_tls)?;
        let pair = || match &c.keys {
            ApiKeys::Pair {
                access_key,
                secret_key,
            } => (access_key.clone(), secret_key.clone()),
            // Validation gives these providers a pair; an empty one is refused by the API.
            _ => (
                crate::config::Secret::new(""),
                crate::config::Secret::new(""),
            ),
        };
        let api = match c.provider {
            Provider::Tcr => {
                let (secret_id, secret_key) = pair();
                Api::Tcr(tcr::Tcr {
                    api: client,
                    region: c.region.clone(),
                    instance: c.registry_id.clone().unwrap_or_default(),
                    secret_id,
                    secret_key,
                })
            }
            Provider::Swr => {
                let (access_key, secret_key) = pair();
                Api::Swr(swr::Swr {
                    api: client,
                    project_id: c.project_id.clone(),
                    access_key,
                    secret_key,
                })
            }
            Provider::Ecr => Api::Ecr(ecr::Ecr {
                api: client,
                region: c.region.clone(),
                registry_id: c.registry_id.clone(),
                keys: c.keys.clone(),
                immutable_tags: c.immutable_tags,
                scan_on_push: c.scan_on_push,
                chain: Default::default(),
            }),
            Provider::Harbor => Api::Harbor(harbor::Harbor {
                api: client,
                login: match &c.keys {
                    ApiKeys::TargetLogin(login) => login.clone(),
                    _ => crate::config::Credentials {
                        username: String::new(),
                        password: crate::config::Secret::new(""),
                    },
                },
            }),
        };
        Ok(Provisioner {
            what: c.what,
            provider: c.provider,
            api,
            known: DashMap::new(),
        })
    }

    /// Whose API this is.
    pub(crate) fn provider(&self) -> Provider {
        self.provider
    }

    /// What a write to `repository` (the target's name) needs to exist.
    pub(crate) fn creation_for(&self, repository: &str) -> Creation {
        match self.what {
            CreateMissing::Namespaces => Creation::Namespace(
                repository
                    .split('/')
                    .next()
                    .unwrap_or(repository)
                    .to_string(),
            ),
            CreateMissing::Repositories => Creation::Repository(repository.to_string()),
        }
    }

    /// Whether the API says it exists.
    pub(crate) async fn exists(&self, creation: &Creation) -> Result<bool, ApiError> {
        let name = match creation {
            Creation::Namespace(n) | Creation::Repository(n) => n.as_str(),
        };
        match &self.api {
            Api::Tcr(a) => a.namespace_exists(name).await,
            Api::Swr(a) => a.namespace_exists(name).await,
            Api::Ecr(a) => a.repository_exists(name).await,
            Api::Harbor(a) => a.project_exists(name).await,
        }
    }

    async fn create(&self, creation: &Creation) -> Result<(), ApiError> {
        let name = match creation {
            Creation::Namespace(n) | Creation::Repository(n) => n.as_str(),
        };
        match &self.api {
            Api::Tcr(a) => a.create_namespace(name).await,
            Api::Swr(a) => a.create_namespace(name).await,
            Api::Ecr(a) => a.create_repository(name).await,
            Api::Harbor(a) => a.create_project(name).await,
        }
    }

    /// Makes sure `creation` exists: asks the API, creates it when absent. A creation refused
    /// because another process made it in between counts as existing. Callers run one ensure
    /// per creation at a time (across replicas too); those that waited find it known.
    /// A refusal of the key or its permission is remembered as long as a creation is.
    pub(crate) async fn ensure(&self, creation: &Creation) -> Result<Ensured, ApiError> {
        if let Some(known) = self.known.get(creation)
            && known.0.elapsed() < KNOWN_FOR
        {
            return match &known.1 {
                None => Ok(Ensured::Existed),
                Some(refusal) => Err(refusal.clone()),
            };
        }
        self.known.retain(|_, (at, _)| at.elapsed() < KNOWN_FOR);
        let ensured = self.find_or_create(creation).await;
        let remembered = match &ensured {
            Ok(_) => Some(None),
            Err(e) if e.kind.is_refusal() => Some(Some(e.clone())),
            Err(_) => None,
        };
        if let Some(outcome) = remembered {
            self.known
                .insert(creation.clone(), (Instant::now(), outcome));
        }
        ensured
    }

    async fn find_or_create(&self, creation: &Creation) -> Result<Ensured, ApiError> {
        if self.exists(creation).await? {
            return Ok(Ensured::Existed);
        }
        match self.create(creation).await {
            Ok(()) => Ok(Ensured::Created),
            Err(e) => match self.exists(creation).await {
                Ok(true) => Ok(Ensured::Existed),
                _ => Err(e),
            },
        }
    }

    /// What `regtee check` can say about the API's credentials: a read-only call proves them;
    /// whether they may create is known only where the API tells (Harbor).
    pub(crate) async fn check(&self) -> Result<String, ApiError> {
        match &self.api {
            Api::Tcr(a) => a.probe().await.map(|()| {
                "the API key pair works (DescribeNamespaces); TencentCloud API has no dry run of CreateNamespace: the key needs tcr:CreateNamespace".to_string()
            }),
            Api::Swr(a) => a.probe().await.map(|()| {
                "the API key pair works (list namespaces); SWR has no dry run of creating one: the key needs SWR Admin (or SWR FullAccess)".to_string()
            }),
            Api::Ecr(a) => a.probe().await.map(|()| {
                "the AWS key works (DescribeRepositories); ECR has no dry run of CreateRepository: the key needs ecr:CreateRepository".to_string()
            }),
            Api::Harbor(a) => {
                let rights = a.rights().await?;
                if rights.admin || rights.restriction == "everyone" {
                    Ok(format!(
                        "this login may create projects ({})",
                        if rights.admin {
                            "a system admin"
                        } else {
                            "project_creation_restriction = everyone"
                        }
                    ))
                } else {
                    Err(ApiError::new(
                        Provider::Harbor,
                        "create projects",
                        ApiErrorKind::Denied(format!(
                            "only admins may create projects here (project_creation_restriction = {})",
                            rights.restriction
                        )),
                    ))
                }
            }
        }
    }

    /// What to do about an API error, for a job's detail and `regtee check`.
    pub(crate) fn fix(&self, e: &ApiError, section: &str) -> Option<String> {
        let permission = match self.provider {
            Provider::Tcr => "tcr:DescribeNamespaces and tcr:CreateNamespace",
            Provider::Swr => "SWR Admin (or SWR FullAccess)",
            Provider::Ecr => "ecr:DescribeRepositories and ecr:CreateRepository",
            Provider::Harbor => "system admin, or set project_creation_restriction to everyone",
        };
        Some(match &e.kind {
            ApiErrorKind::Credentials(_) => match self.provider {
                Provider::Harbor => format!("fix username and password(_env/_file) in {section}"),
                Provider::Ecr => format!(
                    "fix access_key and secret_key(_env/_file) in {section}, or the AWS credentials of this host"
                ),
                _ => format!(
                    "fix access_key and secret_key(_env/_file) in {section} (the cloud API's key pair)"
                ),
            },
            ApiErrorKind::Denied(_) => format!("give the API key {permission}"),
            ApiErrorKind::Unreachable(_) | ApiErrorKind::Timeout | ApiErrorKind::Protocol(_) => {
                format!("check api_url (or region) in {section}, DNS and firewalls from this host")
            }
            ApiErrorKind::Rejected(_) => match self.provider {
                Provider::Tcr => {
                    format!("check registry_id (the tcr-... instance id) and region in {section}")
                }
                Provider::Ecr => format!("check registry_id and region in {section}"),
                _ => format!("check region and project_id in {section}"),
            },
            ApiErrorKind::Throttled(_) | ApiErrorKind::Server(_) => return None,
        })
    }
}
