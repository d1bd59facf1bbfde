"""Runs the SAM transform on template.yaml, as CloudFormation does at deploy time.

`sam validate --lint` checks the template's shape but not everything the
transform refuses (an intrinsic function where SAM wants a literal, say).
This translates it for real, once per value of each choice parameter, with
the code locations replaced by S3 URIs (what `sam package` puts there), and
fails naming what SAM refuses. Run by scripts/test.sh.
"""

import json
import sys

from cfnlint.decode import decode_str
from samtranslator.public.exceptions import InvalidDocumentException
from samtranslator.translator.transform import transform


class Policies:
    """Managed policy names as ARNs, without asking IAM."""

    def get_managed_policy_map(self):
        return {}

    def get_policy_arn(self, name):
        return f"arn:aws:iam::aws:policy/{name}"


def main():
    with open("template.yaml") as f:
        template, _ = decode_str(f.read())
    template = json.loads(json.dumps(template, default=str))
    for resource in template["Resources"].values():
        props = resource.get("Properties", {})
        for key in ("CodeUri", "ContentUri"):
            if key in props:
                props[key] = "s3://bucket/key.zip"
    failed = False
    for params in ({"GatewayAuthorizer": "Enabled"}, {"GatewayAuthorizer": "Disabled"}):
        try:
            out = transform(json.loads(json.dumps(template)), params, Policies())
            print(f"  SAM transform with {params}: {len(out['Resources'])} resources")
        except InvalidDocumentException as e:
            failed = True
            for cause in e.causes:
                print(f"  SAM refuses the template with {params}: {cause}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
