"""cloud-init for a VirtualMachine: a NoCloud seed (a cdrom labelled cidata) built by the operator."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from .common import OBJECT_NAME_PATTERN, ApiModel

# What fits in a seed: generous for cloud-config documents, small next to the 1.5 MB object limit.
MAX_USER_DATA = 65536
MAX_NETWORK_DATA = 16384
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"


class SecretKeyReference(ApiModel):
    """One key of a Secret in the VM's namespace."""

    name: str = Field(description="Name of the Secret (same namespace as the VM).", min_length=1, max_length=253,
                      pattern=OBJECT_NAME_PATTERN)
    key: str = Field(default="userdata", min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN,
                     description="The key holding the user data (default userdata).")


class CloudInit(ApiModel):
    """A cloud-init NoCloud seed: user-data, meta-data (instance-id = the VM's uid, local-hostname = its
    name) and optional network-config on a read-only cdrom labelled cidata. A changed seed applies at
    the next boot (RestartRequired)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "!(has(self.userData) && has(self.userDataSecretRef))",
         "message": "set userData or userDataSecretRef, not both"},
    ]})

    user_data: str | None = Field(default=None, max_length=MAX_USER_DATA, description=(
        f"The user-data document (e.g. starting with #cloud-config), at most {MAX_USER_DATA} characters. "
        "It is visible to whoever can read the VirtualMachine: put secrets in userDataSecretRef."))
    user_data_secret_ref: SecretKeyReference | None = Field(default=None, description=(
        "Read user-data from a Secret instead (never copied into status, events or logs). A changed Secret "
        "is picked up at the VM's next reconcile."))
    network_data: str | None = Field(default=None, max_length=MAX_NETWORK_DATA, description=(
        f"The network-config document (cloud-init network config v1 or v2), at most {MAX_NETWORK_DATA} "
        "characters."))
