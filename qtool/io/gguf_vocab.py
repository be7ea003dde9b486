"""Tokenizer metadata for GGUF files: a Hugging Face tokenizer directory -> `tokenizer.ggml.*` keys (formats.md 1.6).

`vocab_from_hf(dir, vocab_size)` reads tokenizer.json / tokenizer.model / tokenizer_config.json /
special_tokens_map.json / chat_template.jinja (never model weights) and returns a frozen `GGUFVocab`;
`GGUFVocab.write(writer)` adds the keys to a `gguf.GGUFWriter`. Everything is checked before anything is
written: an unsupported tokenizer is a `ModelError`, never a file that loads but tokenizes differently.

Two tokenizer families, the ones llama.cpp's converter writes for Llama/Qwen2/Mistral (conversion/base.py):

* byte-level BPE, `tokenizer.ggml.model = "gpt2"` (Llama-3, Qwen2, SmolLM, GPT-2): tokens in id order in GPT-2
  byte-to-unicode form, holes up to `vocab_size` filled with `[PAD{i}]` UNUSED; types from the added-token
  info (special, or looking special -> CONTROL 3, other added -> USER_DEFINED 4, rest NORMAL 1); merges as
  "left right" strings. `tokenizer.ggml.pre` picks llama.cpp's pre-tokenizer regex. Like the converter's
  `get_vocab_base_pre`, the tokenizer's ids for a fixed test text (`CHKTXT`) are hashed and looked up in
  llama.cpp's table (`PRE_BY_HASH`); an unknown hash falls back to reading tokenizer.json's `pre_tokenizer`
  (plain ByteLevel -> "gpt-2", Digits + ByteLevel -> "smollm", a Split with a regex llama.cpp implements ->
  that name, `_SPLIT_PRE`), and anything else is a ModelError naming the hash, the pre_tokenizer JSON and
  the names llama.cpp knows.
* SentencePiece BPE, `tokenizer.ggml.model = "llama"`, pre "default" (Llama-2, Mistral v0.1-0.3): pieces,
  scores and types (byte `<0x..>` 6, control 3, unknown 2, user-defined 4) from tokenizer.model (parsed with
  sentencepiece's protobuf, no pickle), or, without it, from a tokenizer.json BPE model with byte fallback and
  Metaspace (or Prepend/Replace "▁") whitespace handling; scores are then minus the rank of the first merge
  making the piece, which orders llama.cpp's score-driven merging like the HF merge ranks.

Token strings must be unique (llama.cpp aborts otherwise): a duplicate keeps its text on the id HF's added
tokens give it (else the lowest id) and the other ids become `[DUP{i}]` UNUSED; empty strings become
`[EMPTY_{i}]` as llama.cpp's loader would do. Special ids come from gguf-py's `SpecialVocab` (tokenizer.json
added tokens + tokenizer_config.json + config.json), completed by looking the configured strings up in the
whole vocabulary; add_bos/add_eos are tokenizer_config.json's explicit flags, else what the tokenizer.json
post-processor really adds (as transformers does), since llama.cpp's defaults differ per pre-tokenizer.

Known differences no metadata can remove (kept as `notes`): llama.cpp's SPM tokenizer adds the space prefix
after every special/added token too, while HF's Metaspace(prepend_scheme="first") adds it only at the start
of the text, and not at all when the text starts with a space (sentencepiece itself, like llama.cpp, does);
added tokens with lstrip/rstrip/single_word are matched literally by llama.cpp.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from qtool.errors import ModelError

# ---- facts from llama.cpp (llama-cpp-python 0.3.36 sdist, vendor/llama.cpp) ----

# conversion/base.py get_vocab_base_pre: the text whose token ids are hashed (non-ASCII written as escapes);
# sha256 of its UTF-8 bytes is a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da.
CHKTXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b'
    '\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333'
    ' 33333333 3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2'
    '\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d'
    '\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 \'\'\'\'\'\'`'
    '``````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make i'
    't, \'D you like some tea? We\'Ve a\'lL'
)

# conversion/base.py get_vocab_base_pre: sha256(str(ids of CHKTXT)) -> tokenizer.ggml.pre. Kept in the
# converter's order; where a hash appears twice the later entry wins, as there.
_PRE_HASHES: tuple[tuple[str, str], ...] = (
    ("b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b", "chatglm-bpe"),  # THUDM/glm-4-9b-chat
    ("81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516", "chatglm-bpe"),  # THUDM/glm-4-9b-chat
    ("a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2", "glm4"),  # THUDM/glm-4-9b-hf
    ("9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902", "glm4"),  # zai-org/GLM-4.5-Air
    ("cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267", "glm4"),  # zai-org/GLM-4.7-Flash
    ("1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35", "minerva-7b"),  # sapienzanlp/Minerva-7B-base-v1.0
    ("7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664", "hunyuan"),  # tencent/Hunyuan-A13B-Instruct
    ("bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6", "hunyuan-dense"),  # tencent/Hunyuan-4B-Instruct
    ("e6ddf9c6686791c12d698d34c31ab9be1fea9af5a3d9a6909783ab382198ae1c", "hy_v4"),  # tencent/Hy4-preview
    ("a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6", "falcon-h1"),  # tiiuae/Falcon-H1-0.5B-Base
    ("60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86", "falcon-h1"),  # tiiuae/Falcon-H1-1B-Base
    ("3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896", "falcon-h1"),  # tiiuae/Falcon-H1-7B-Base
    ("48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b", "falcon-h1"),  # tiiuae/Falcon-H1-34B-Base
    ("81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890", "kimi-k2"),  # moonshotai/Kimi-K2-Base
    ("d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c", "qwen2"),  # Qwen/Qwen3-Embedding-0.6B
    ("1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f", "qwen35"),  # openbmb/MiniCPM-V-4_6
    ("66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273", "grok-2"),  # alvarobartt/grok-2-tokenizer
    ("b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df", "jina-v2-de"),  # aari1995/German_Semantic_V3
    ("0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4", "gpt-2"),  # evilfreelancer/ruGPT3XL
    ("9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7", "lfm2"),  # LiquidAI/LFM2.5-8B-A1B
    ("846deafc5b0fa786186fa4ae6c7b49903cf2f1d1895bdb80b9120d60be135252", "gemma4"),  # danish-foundation-models/DFM-Mimir
    ("0a766d034107bc736a3f2dc4968fd62e54a3570f1454443e0c5a4cc6bd7941ed", "spark2_5"),  # XHToken/Spark-X2.5-1.7B
    ("0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5", "llama-bpe"),  # meta-llama/Meta-Llama-3-8B
    ("049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754", "deepseek-llm"),  # deepseek-ai/deepseek-llm-7b-base
    ("347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821", "deepseek-coder"),
    ("8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed", "falcon"),  # tiiuae/falcon-7b
    ("0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f", "bert-bge"),  # BAAI/bge-small-en-v1.5
    ("9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e", "falcon3"),  # tiiuae/Falcon3-7B-Base
    ("8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7", "bert-bge-large"),  # BAAI/bge-large-zh-v1.5
    ("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166", "mpt"),  # mosaicml/mpt-7b
    ("35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34", "starcoder"),  # bigcode/starcoder2-3b
    ("3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454", "gpt-2"),  # openai-community/gpt2
    ("32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3", "stablelm2"),  # stabilityai/stablelm-2-zephyr-1_6b
    ("6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff", "refact"),  # smallcloudai/Refact-1_6-base
    ("9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8", "command-r"),  # CohereForAI/c4ai-command-r-v01
    ("d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1", "tiny_aya"),  # CohereLabs/tiny-aya-base
    ("52df12b4c8d4176e7481aab4b6e8454d1fd0a210a04a574f6d4e067d10e23c3e", "cohere2moe"),  # CohereLabs/North-Mini-Code-1.0
    ("e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea", "qwen2"),  # Qwen/Qwen1.5-7B
    ("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166", "olmo"),  # allenai/OLMo-1.7-7B-hf
    ("a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e", "dbrx"),  # databricks/dbrx-base
    ("c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448", "jina-v1-en"),  # jinaai/jina-reranker-v1-tiny-en
    ("0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f", "jina-v2-en"),  # jinaai/jina-embeddings-v2-base-en
    ("171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643", "jina-v2-es"),  # jinaai/jina-embeddings-v2-base-es
    ("27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6", "jina-v2-de"),  # jinaai/jina-embeddings-v2-base-de
    ("a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d", "jina-v5-nano"),  # jinaai/jina-embeddings-v5-text-nano
    ("c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d", "smaug-bpe"),  # abacusai/Smaug-Llama-3-70B-Instruct
    ("c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360", "poro-chat"),  # LumiOpen/Poro-34B-chat
    ("7967bfa498ade6b757b064f31e964dddbb80f8f9a4d68d4ba7998fcf281c531a", "jina-v2-code"),  # jinaai/jina-embeddings-v2-base-code
    ("7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee", "viking"),  # LumiOpen/Viking-7B
    ("b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901", "jais"),  # core42/jais-13b
    ("bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a", "jais-2"),  # inceptionai/Jais-2-8B-Chat
    ("7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f", "codeshell"),  # WisdomShell/CodeShell-7B
    ("63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e", "tekken"),  # mistralai/Mistral-Nemo-Base-2407
    ("855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249", "smollm"),  # HuggingFaceTB/SmolLM-135M
    ("3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7", "bloom"),  # bigscience/bloom
    ("bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21", "gpt3-finnish"),  # TurkuNLP/gpt3-finnish-small
    ("4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae", "exaone"),  # LGAI-EXAONE/EXAONE-3.0-7.8B-Instruct
    ("fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085", "phi-2"),  # microsoft/phi-2
    ("60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450", "chameleon"),  # facebook/chameleon-7b
    ("8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65", "roberta-bpe"),
    ("ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb", "gigachat"),  # ai-sage/GigaChat-20B-A3B-instruct
    ("d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1", "megrez"),  # Infinigence/Megrez-3B-Instruct
    ("877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5", "deepseek-v3"),  # deepseek-ai/DeepSeek-V3
    ("b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5", "deepseek-r1-qwen"),
    ("ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e", "gpt-4o"),  # Xenova/gpt-4o
    ("7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f", "superbpe"),  # UW/OLMo2-8B-SuperBPE-t180k
    ("1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15", "trillion"),  # trillionlabs/Trillion-7B-preview
    ("96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224", "bailingmoe"),  # inclusionAI/Ling-lite
    ("d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406", "llama4"),  # meta-llama/Llama-4-Scout-17B-16E-Instruct
    ("0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3", "pixtral"),  # mistral-community/pixtral-12b
    ("d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec", "seed-coder"),  # ByteDance-Seed/Seed-Coder-8B-Base
    ("b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf", "a.x-4.0"),  # skt/A.X-4.0
    ("f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4", "midm-2.0"),  # K-intelligence/Midm-2.0-Base-Instruct
    ("169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51", "lfm2"),  # LiquidAI/LFM2.5-350M
    ("2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb", "exaone4"),  # LGAI-EXAONE/EXAONE-4.0-32B
    ("a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756", "mellum"),  # JetBrains/Mellum-4b-base
    ("a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152", "modern-bert"),  # answerdotai/ModernBERT-base
    ("49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df", "afmoe"),  # arcee-ai/Trinity-Tokenizer
    ("9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206", "bailingmoe2"),  # inclusionAI/Ling-mini-base-2.0
    ("53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e", "granite-docling"),  # ibm-granite/granite-docling-258M
    ("f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95", "minimax-m2"),  # MiniMaxAI/MiniMax-M2
    ("4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665", "kormo"),  # KORMo-Team/KORMo-tokenizer
    ("9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1", "youtu"),  # tencent/Youtu-LLM-2B
    ("16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91", "solar-open"),  # upstage/Solar-Open-100B
    ("6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f", "exaone-moe"),  # LGAI-EXAONE/K-EXAONE-236B-A23B
    ("d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4", "qwen35"),  # Qwen/Qwen3.5-9B-Instruct
    ("b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d", "joyai-llm"),  # jdopensource/JoyAI-LLM-Flash
    ("e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869", "kanana2"),  # kakaocorp/kanana-2-30b-a3b-instruct-2601
    ("862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015", "f2llmv2"),  # codefuse-ai/F2LLM-v2-4B
    ("62f6fb0a6fd5098caeabb19b07a5c1099cafc8b9c40eab6ea89ece4ec02fbc57", "sarvam-moe"),  # sarvamai/sarvam-30b
    ("f728162c1315c26e40249849799b4ba3fe584c32084b4795b03eb295e63cb5af", "talkie"),  # lewtun/talkie-1930-13b-it-hf
    ("36f3066e97b7f3994b379aaacde306c1444c6ae84e81a5ae3cd2b7ed3b8c42d4", "minicpm5"),  # openbmb/MiniCPM5-1B
    ("f241072145675bf8322086f115aebad05e9f869557a238bf2150a2a417d1bf60", "granite-embed-multi-97m"),
    ("789696f5946cc0fc59371f39f6097cafed196b3acded6140432f26bbb1ae1669", "granite-embed-multi-311m"),
    ("9dcf830ee9990cdbf78cc523a5f7bd9ad8f3f9890c2d3581d2785ad10f07049d", "mellum2"),  # JetBrains/Mellum2-12B-A2.5B-Base
    ("972da7b59cec44d1f0a490a86c96df53859e486e481563e5dddac155013d87ac", "laguna"),  # poolside/Laguna-XS.2
    ("653660222fb704f61cbf2b618a8ae6502b7f8b20c980f9a5de07ed78e13319cd", "ufakzeka"),  # ufakai/ufakzeka-1
)
PRE_BY_HASH: dict[str, str] = dict(_PRE_HASHES)

# src/llama-vocab.cpp llama_vocab::impl::load: every tokenizer.ggml.pre a BPE vocabulary may name; anything else
# is "unknown pre-tokenizer type" at load time.
LLAMA_CPP_PRE_NAMES: frozenset[str] = frozenset((
    "default", "minicpm5", "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
    "jina-v5-nano", "deepseek-llm", "deepseek-coder", "deepseek-v3", "spark2_5", "youtu", "falcon", "mpt", "starcoder",
    "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum", "modern-bert",
    "jais-2", "gemma4", "granite-embed-multi-311m", "sarvam-moe", "jina-v1-en", "jina-v2-code", "roberta-bpe",
    "whitespace", "refact", "command-r", "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "qwen35", "stablelm2", "olmo",
    "dbrx", "smaug-bpe", "poro-chat", "chatglm-bpe", "glm4", "glm5", "viking", "jais", "tekken", "smollm", "codeshell",
    "bloom", "gpt3-finnish", "exaone", "exaone4", "exaone-moe", "chameleon", "minerva-7b", "megrez", "gpt-4o", "llama4",
    "kanana2", "talkie", "granite-embed-multi-97m", "tiny_aya", "cohere2moe", "superbpe", "trillion", "granite-docling",
    "bailingmoe", "bailingmoe2", "llada-moe", "seed-coder", "hunyuan", "hunyuan-dense", "hy_v4", "joyai-llm", "kimi-k2",
    "ufakzeka", "grok-2", "afmoe", "laguna", "minimax-m2", "solar-open", "mellum2",
))
# the names for which llama-vocab.cpp sets ignore_merges (a whole pre-token found in the vocabulary is taken as is)
_IGNORE_MERGES_PRE = frozenset(("minicpm5", "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                                "midm-2.0", "lfm2", "jina-v5-nano", "youtu", "glm4", "glm5", "tekken",
                                "granite-embed-multi-97m"))

# Structural fallback: a tokenizer.json pre_tokenizer `Sequence[Split(Regex=R, Isolated), ByteLevel(use_regex=false)]`
# whose R is, up to the (?i:'s|...) spelling, the regex llama-vocab.cpp (llm_tokenizer_bpe) runs for these names.
# Only regexes llama.cpp implements exactly are listed (gpt-4o and tekken are approximated there, so they are
# accepted only through their hash). Each regex maps to (name, ignore_merges llama.cpp uses for that name).
_SPLIT_PRE: dict[str, tuple[tuple[str, bool], ...]] = {
    # Llama-3 (llama-bpe ignores merges; smaug-bpe and dbrx run the same regex without)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        (("llama-bpe", True), ("smaug-bpe", False)),
    # Qwen2 / Qwen2.5 (also stablelm2, hunyuan, solar-open, grok-2)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        (("qwen2", False),),
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": (("qwen35", False),),
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)"
    r"|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}":
        (("jais-2", False),),
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+":
        (("seed-coder", False),),
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?"
    r"|\s*[\r\n]|\s+(?!\S)|\s+": (("exaone-moe", False),),
    r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": (("ufakzeka", False),),
}
_CI_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_CS_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"  # llama.cpp's spelling of the same

_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "mask", "eot", "eom")  # tokenizer.ggml.<t>_token_id keys
_BYTE_RE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPIECE = "\u2581"  # ▁, SentencePiece's space

T = gguf.TokenType


@dataclass(frozen=True)
class GGUFVocab:
    """Everything `tokenizer.ggml.*` a llama.cpp GGUF needs; `tokens[i]` is token id i, len(tokens) = vocab_size."""

    model: str                                   # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str                                     # tokenizer.ggml.pre
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]                 # gguf.TokenType values
    scores: tuple[float, ...] | None             # SPM only
    merges: tuple[str, ...]                      # BPE only: "left right", rank = index
    special_ids: tuple[tuple[str, int], ...]     # (("bos", 1), ("eos", 2), ...): tokenizer.ggml.<name>_token_id
    add_bos: bool | None
    add_eos: bool | None
    add_sep: bool | None = None
    add_space_prefix: bool | None = None         # SPM only
    chat_template: str | tuple[tuple[str, str], ...] | None = None  # a tuple is (name, template) pairs, "default" first
    pre_source: str = ""                         # how `pre` was chosen: "hash", "structure" or "sentencepiece"
    chkhsh: str | None = None                    # the CHKTXT hash (BPE only)
    renamed: tuple[tuple[int, str, str], ...] = ()  # (id, original text, written text) for duplicates/empties
    notes: tuple[str, ...] = ()                  # known llama.cpp/HF differences this tokenizer is exposed to

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def special(self) -> dict[str, int]:
        return dict(self.special_ids)

    def write(self, writer: gguf.GGUFWriter) -> None:
        """Add the tokenizer keys to `writer` (before its header is written). Types as llama.cpp requires them:
        token_type INT32, scores FLOAT32, special ids UINT32, flags BOOL."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(list(self.tokens))
        writer.add_token_types([int(t) for t in self.token_types])
        if self.scores is not None:
            writer.add_token_scores([float(s) for s in self.scores])
        if self.merges:
            writer.add_token_merges(list(self.merges))
        for name, tid in self.special_ids:
            getattr(writer, f"add_{name}_token_id")(int(tid))
        if self.add_bos is not None:
            writer.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            writer.add_add_eos_token(self.add_eos)
        if self.add_sep is not None:
            writer.add_add_sep_token(self.add_sep)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if isinstance(self.chat_template, str):
            writer.add_chat_template(self.chat_template)
        elif self.chat_template:
            writer.add_chat_template([{"name": n, "template": t} for n, t in self.chat_template])


def vocab_from_hf(tokenizer_dir: Path, vocab_size: int) -> GGUFVocab:
    """The GGUF tokenizer of the HF tokenizer in `tokenizer_dir`, padded to `vocab_size` (= token_embd rows).

    Raises ModelError for a missing/corrupt/unsupported tokenizer, an id >= vocab_size, or a byte-level BPE
    tokenizer whose llama.cpp pre-tokenizer cannot be determined."""
    d = Path(tokenizer_dir)
    if vocab_size <= 0:
        raise ModelError(f"{d}: vocab_size must be positive, got {vocab_size}")
    tj = _read_json(d / "tokenizer.json")
    if tj is None:
        if (d / "tokenizer.model").is_file():
            return _from_sentencepiece(d, None, vocab_size)
        seen = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        shown = ", ".join(seen[:20]) + (f", ... ({len(seen)} files)" if len(seen) > 20 else "")
        raise ModelError(f"{d}: no tokenizer.json or tokenizer.model (found: {shown or 'nothing'}); "
                         "qtool writes GGUF tokenizers from these files only")
    if not isinstance(tj, dict):
        raise ModelError(f"{d}/tokenizer.json: not a tokenizers JSON object")
    model = tj.get("model")
    mtype = model.get("type") if isinstance(model, dict) else None
    if mtype == "BPE":
        byte_level = _has_step(tj.get("pre_tokenizer"), "ByteLevel") or _has_step(tj.get("decoder"), "ByteLevel")
        spm_like = (bool(model.get("byte_fallback")) or _has_step(tj.get("pre_tokenizer"), "Metaspace")
                    or _replaces_space(tj.get("normalizer")))
        if byte_level and not spm_like:
            return _from_bytelevel_bpe(d, tj, vocab_size)
        if spm_like and not byte_level:
            if (d / "tokenizer.model").is_file():
                return _from_sentencepiece(d, tj, vocab_size)
            return _from_spm_json(d, tj, vocab_size)
        raise ModelError(f"{d}/tokenizer.json: a BPE model that is neither byte-level (GPT-2 style) nor "
                         f"SentencePiece-style (byte_fallback/Metaspace): pre_tokenizer "
                         f"{_short(tj.get('pre_tokenizer'))}, decoder {_short(tj.get('decoder'))}")
    what = {"WordPiece": "WordPiece (BERT-style; llama.cpp model 'bert')",
            "Unigram": "Unigram (T5-style; llama.cpp model 't5')",
            "WordLevel": "WordLevel"}.get(mtype, repr(mtype))
    raise ModelError(f"{d}/tokenizer.json: unsupported tokenizer model {what}; qtool writes byte-level BPE "
                     "('gpt2') and SentencePiece BPE ('llama') tokenizers only")


# ---- byte-level BPE ----

def _from_bytelevel_bpe(d: Path, tj: dict, vocab_size: int) -> GGUFVocab:
    model = tj["model"]
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ModelError(f"{d}/tokenizer.json: BPE {key}={model[key]!r} is not supported by llama.cpp's BPE")
    if model.get("dropout"):
        raise ModelError(f"{d}/tokenizer.json: BPE dropout={model['dropout']} makes tokenization random")
    tok = _hf_tokenizer(d, tj)
    # ids as the tokenizers library (hence transformers) really assigns them: an added token whose text is already
    # in the model vocabulary takes that id, one that is not takes the next free id, whatever the JSON says
    vocab = tok.get_vocab(with_added_tokens=False)
    if not vocab:
        raise ModelError(f"{d}/tokenizer.json: BPE model has no vocab")
    texts: dict[int, str] = {int(i): t for t, i in vocab.items()}
    types: dict[int, int] = dict.fromkeys(texts, int(T.NORMAL))
    added = tok.get_added_tokens_decoder()
    for i, at in added.items():
        if at.special or _looks_special(at.content):
            texts[i], types[i] = at.content, int(T.CONTROL)
        else:  # llama.cpp matches user-defined tokens on raw text; the converter writes ▁ as a space
            texts[i], types[i] = at.content.replace(_SPIECE, " "), int(T.USER_DEFINED)
    tokens, ttypes = _fill(d, texts, types, vocab_size)
    tokens, ttypes, renamed = _dedupe(tokens, ttypes, set(added))

    config = _tokenizer_config(d)
    if config.get("add_prefix_space") is True:  # transformers then prefixes a space; llama.cpp's BPE never does
        raise ModelError(f"{d}/tokenizer_config.json: add_prefix_space=true on a byte-level BPE tokenizer; "
                         "llama.cpp's BPE tokenizer never adds a prefix space, so tokenization would differ")
    sv = _special_vocab(d, vocab_size, load_merges=True)
    if not sv.merges:
        raise ModelError(f"{d}/tokenizer.json: byte-level BPE without merges (llama.cpp: 'cannot find tokenizer merges')")
    special = _special_ids(d, sv, config, tokens)
    add_bos, add_eos, add_sep = _add_flags(tok, config, special, sv)
    pre, source, chkhsh = _detect_pre(d, tj, tok, config, special, add_bos, add_eos)
    notes = _added_token_notes(added)
    if tj.get("normalizer"):
        notes += (f"normalizer {_short(tj['normalizer'])} is not applied by llama.cpp's BPE tokenizer",)
    _check_eos(d, special, add_bos)
    return GGUFVocab(model="gpt2", pre=pre, tokens=tokens, token_types=ttypes, scores=None, merges=tuple(sv.merges),
                     special_ids=_ordered(special), add_bos=add_bos, add_eos=add_eos, add_sep=add_sep,
                     chat_template=_template(sv.chat_template), pre_source=source, chkhsh=chkhsh,
                     renamed=renamed, notes=notes)


def chk_hash(ids: list[int]) -> str:
    """llama.cpp's hash of a token-id list: sha256 of Python's str() of the list."""
    return hashlib.sha256(str(list(ids)).encode()).hexdigest()


def _detect_pre(d: Path, tj: dict, tok, config: dict, special: dict[str, int], add_bos: bool,
                add_eos: bool) -> tuple[str, str, str]:
    """(pre name, "hash" or "structure", CHKTXT hash) or a ModelError."""
    raw = tok.encode(CHKTXT, add_special_tokens=False).ids
    # what transformers' tokenizer.encode(CHKTXT) gives (the converter hashes that): the flags decide, as in v5
    primary = ([special["bos"]] if add_bos and "bos" in special else []) + raw + (
        [special["eos"]] if add_eos and "eos" in special else [])
    chkhsh = chk_hash(primary)
    for ids in (primary, tok.encode(CHKTXT).ids, raw):
        name = PRE_BY_HASH.get(chk_hash(ids))
        if name is not None:
            if name not in LLAMA_CPP_PRE_NAMES:  # bert-bge, jina-v2-en: WordPiece models' names
                raise ModelError(f"{d}: the tokenizer hashes to llama.cpp's {name!r}, which is not a BPE "
                                 "pre-tokenizer qtool can write")
            return name, "hash", chkhsh
    name = _structural_pre(tj, config)
    if name is not None:
        return name, "structure", chkhsh
    raise ModelError(
        f"{d}/tokenizer.json: cannot tell which llama.cpp pre-tokenizer reproduces this tokenizer: its hash of "
        f"llama.cpp's test text, {chkhsh}, is not in llama.cpp's table, and its pre_tokenizer "
        f"{_short(tj.get('pre_tokenizer'), 1000)} (normalizer {_short(tj.get('normalizer'))}, ignore_merges "
        f"{bool(tj['model'].get('ignore_merges'))}) is not a structure qtool maps to one. Writing a wrong "
        f"tokenizer.ggml.pre would load and tokenize differently. llama.cpp knows: "
        f"{', '.join(sorted(LLAMA_CPP_PRE_NAMES))}")


def _structural_pre(tj: dict, config: dict) -> str | None:
    """The llama.cpp pre name whose regexes and merge mode equal tokenizer.json's pre-tokenization, or None."""
    norm = tj.get("normalizer")
    if norm and not (norm.get("type") == "NFC" or (norm.get("type") == "Sequence" and not norm.get("normalizers"))):
        return None
    ignore_merges = bool(tj["model"].get("ignore_merges"))
    steps = _steps(tj.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]

    def byte_level(s: dict, use_regex: bool) -> bool:
        return not s.get("add_prefix_space", True) and bool(s.get("use_regex", True)) == use_regex

    candidates: tuple[tuple[str, bool], ...] = ()
    if kinds == ["ByteLevel"] and byte_level(steps[0], True):
        candidates = (("gpt-2", False),)
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level(steps[1], True):
        clean = bool(config.get("clean_up_tokenization_spaces"))  # decoding only: smollm keeps spaces
        candidates = (("starcoder", False),) if clean else (("smollm", False),)
    elif kinds == ["Split", "ByteLevel"] and byte_level(steps[1], False):
        split = steps[0]
        pattern = split.get("pattern") or {}
        if "Regex" in pattern and split.get("behavior") == "Isolated" and not split.get("invert"):
            want = _canon_regex(pattern["Regex"])
            for rx, names in _SPLIT_PRE.items():
                if _canon_regex(rx) == want:
                    candidates = names
    for name, im in candidates:
        if im == ignore_merges:
            return name
    return None


def _canon_regex(rx: str) -> str:
    return rx.replace("\r", r"\r").replace("\n", r"\n").replace(_CI_CONTRACTIONS, _CS_CONTRACTIONS)


# ---- SentencePiece ----

def _from_sentencepiece(d: Path, tj: dict | None, vocab_size: int) -> GGUFVocab:
    """tokenizer.model (a sentencepiece ModelProto) + the HF files next to it."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # protobuf missing
        raise ModelError(f"{d}/tokenizer.model: reading it needs sentencepiece's protobuf module: {e}") from None
    proto = pb.ModelProto()
    try:
        proto.ParseFromString((d / "tokenizer.model").read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ModelError(f"{d}/tokenizer.model: not a sentencepiece model: {e}") from None
    if not proto.pieces:
        raise ModelError(f"{d}/tokenizer.model: not a sentencepiece model (no pieces)")
    mtype = proto.trainer_spec.model_type
    if mtype != pb.TrainerSpec.BPE:
        name = pb.TrainerSpec.ModelType.Name(mtype)
        raise ModelError(f"{d}/tokenizer.model: sentencepiece model_type {name} is not supported; llama.cpp's "
                         "'llama' tokenizer implements SentencePiece BPE only")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise ModelError(f"{d}/tokenizer.model: treat_whitespace_as_suffix is not supported by llama.cpp's SPM")
    if len(proto.pieces) > vocab_size:
        raise ModelError(f"{d}/tokenizer.model: {len(proto.pieces)} pieces but the model has {vocab_size} "
                         "embedding rows")
    texts = {i: p.piece for i, p in enumerate(proto.pieces)}
    types = {i: int(p.type) or int(T.NORMAL) for i, p in enumerate(proto.pieces)}
    scores = {i: float(p.score) for i, p in enumerate(proto.pieces)}
    config = _tokenizer_config(d)
    tok = _hf_tokenizer(d, tj) if tj is not None else None
    if tok is not None:  # the HF tokenizer must be this sentencepiece model, or llama.cpp would tokenize otherwise
        for piece, i in tok.get_vocab(with_added_tokens=False).items():
            if texts.get(i, piece) != piece:
                raise ModelError(f"{d}: tokenizer.json and tokenizer.model disagree on token {i} "
                                 f"({piece!r} vs {texts[i]!r})")
    owners = _apply_added_tokens(d, tok, config, texts, types, scores, vocab_size)
    tokens, ttypes = _fill(d, texts, types, vocab_size)
    tokens, ttypes, renamed = _dedupe(tokens, ttypes, owners)
    score_list = tuple(scores.get(i, -1000.0) for i in range(vocab_size))

    ns = proto.normalizer_spec
    add_space_prefix = _spm_space_prefix(tj, config)
    if add_space_prefix is None:
        add_space_prefix = bool(ns.add_dummy_prefix)
    notes: list[str] = []
    if tj is None and ((ns.name not in ("identity", "") and ns.precompiled_charsmap) or ns.remove_extra_whitespaces):
        notes.append(f"sentencepiece normalizer {ns.name!r} (remove_extra_whitespaces={ns.remove_extra_whitespaces}) "
                     "is not applied by llama.cpp (nor by transformers' fast tokenizer)")
    trainer_ids = {"unk": proto.trainer_spec.unk_id, "bos": proto.trainer_spec.bos_id,
                   "eos": proto.trainer_spec.eos_id, "pad": proto.trainer_spec.pad_id}
    return _finish_spm(d, tj, tok, config, tokens, ttypes, score_list, renamed, add_space_prefix, notes,
                       vocab_size, trainer_ids)


def _from_spm_json(d: Path, tj: dict, vocab_size: int) -> GGUFVocab:
    """A SentencePiece-style BPE tokenizer.json (byte fallback, ▁ for spaces) without its tokenizer.model."""
    model = tj["model"]
    norm = tj.get("normalizer")
    for step in _steps(norm):
        if step.get("type") not in ("Prepend", "Replace"):
            raise ModelError(f"{d}/tokenizer.json: normalizer {_short(norm)} is not applied by llama.cpp's SPM tokenizer")
    pre = tj.get("pre_tokenizer")
    if pre and [s.get("type") for s in _steps(pre)] != ["Metaspace"]:
        raise ModelError(f"{d}/tokenizer.json: pre_tokenizer {_short(pre)}: llama.cpp's SPM tokenizer does no "
                         "pre-tokenization beyond the ▁ space prefix")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ModelError(f"{d}/tokenizer.json: BPE {key}={model[key]!r} is not supported by llama.cpp")
    tok = _hf_tokenizer(d, tj)
    vocab = tok.get_vocab(with_added_tokens=False)
    if not vocab:
        raise ModelError(f"{d}/tokenizer.json: BPE model has no vocab")
    merges = _merge_pairs(d, model.get("merges") or [])
    first_rank: dict[str, int] = {}
    for rank, (a, b) in enumerate(merges):
        first_rank.setdefault(a + b, rank)
    texts = {int(i): t for t, i in vocab.items()}
    types = {i: int(T.BYTE) if _BYTE_RE.fullmatch(t) else int(T.NORMAL) for i, t in texts.items()}
    # llama.cpp merges the adjacent pair whose concatenation has the highest score: minus the first merge rank
    # making that piece reproduces the HF merge order; pieces no merge makes come after every merge
    scores = {i: -float(first_rank[t]) if t in first_rank else -float(len(merges) + i) for i, t in texts.items()}
    unk = model.get("unk_token")
    if unk is not None and unk in vocab:
        types[int(vocab[unk])] = int(T.UNKNOWN)
    config = _tokenizer_config(d)
    owners = _apply_added_tokens(d, tok, config, texts, types, scores, vocab_size)
    tokens, ttypes = _fill(d, texts, types, vocab_size)
    tokens, ttypes, renamed = _dedupe(tokens, ttypes, owners)
    score_list = tuple(scores.get(i, -1000.0) for i in range(vocab_size))
    add_space_prefix = _spm_space_prefix(tj, config)
    if add_space_prefix is None:
        add_space_prefix = False
    return _finish_spm(d, tj, tok, config, tokens, ttypes, score_list, renamed, add_space_prefix, [], vocab_size, {})


def _finish_spm(d, tj, tok, config, tokens, ttypes, scores, renamed, add_space_prefix, notes, vocab_size,
                trainer_ids):
    byte_tokens = {t for t, ty in zip(tokens, ttypes) if ty == T.BYTE}
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in byte_tokens]
    if missing:
        raise ModelError(f"{d}: SentencePiece vocabulary without byte-fallback pieces ({len(missing)} of <0x00>..<0xFF> "
                         f"missing, e.g. {missing[0]}); llama.cpp's SPM tokenizer needs them for characters outside "
                         "the vocabulary")
    sv = _special_vocab(d, vocab_size, load_merges=False)
    special = _special_ids(d, sv, config, tokens)
    for name, tid in trainer_ids.items():
        if name not in special and 0 <= tid < vocab_size:
            special[name] = tid
    if "unk" in special and ttypes[special["unk"]] in (T.CONTROL, T.NORMAL):
        ttypes = ttypes[:special["unk"]] + (int(T.UNKNOWN),) + ttypes[special["unk"] + 1:]
    if tok is not None:
        add_bos, add_eos, add_sep = _add_flags(tok, config, special, sv)
    else:  # a bare tokenizer.model: sentencepiece's Llama convention unless the config says otherwise
        bos_flag, eos_flag = config.get("add_bos_token"), config.get("add_eos_token")
        add_bos = bos_flag if isinstance(bos_flag, bool) else True
        add_eos = eos_flag if isinstance(eos_flag, bool) else False
        add_sep = None
    _check_eos(d, special, add_bos)
    notes = list(notes)
    if add_space_prefix:
        notes.append("llama.cpp adds the ▁ space prefix after every special/added token too; HF's Metaspace "
                     "prepend_scheme='first' only at the start of the text")
        notes.append("a text that starts with a space gets the ▁ prefix from llama.cpp and sentencepiece but not "
                     "from HF's Metaspace")
    notes.extend(_added_token_notes(tok.get_added_tokens_decoder() if tok is not None else {}))
    return GGUFVocab(model="llama", pre="default", tokens=tokens, token_types=ttypes, scores=scores, merges=(),
                     special_ids=_ordered(special), add_bos=add_bos, add_eos=add_eos, add_sep=add_sep,
                     add_space_prefix=add_space_prefix, chat_template=_template(sv.chat_template),
                     pre_source="sentencepiece", renamed=renamed, notes=tuple(notes))


def _apply_added_tokens(d, tok, config, texts, types, scores, vocab_size) -> set[int]:
    """Overlay the added tokens on an SPM vocabulary: those of tokenizer.json as the tokenizers library assigns
    them, else (a bare tokenizer.model) added_tokens.json then tokenizer_config.json's added_tokens_decoder, as the
    converter does. A re-declared piece keeps its sentencepiece type."""
    added: dict[int, tuple[str, bool]] = {}
    if tok is not None:
        added = {int(i): (at.content, bool(at.special)) for i, at in tok.get_added_tokens_decoder().items()}
    else:
        extra = _read_json(d / "added_tokens.json")
        if isinstance(extra, dict):
            added.update({int(i): (t, False) for t, i in extra.items()})
        for i, at in (config.get("added_tokens_decoder") or {}).items():
            added[int(i)] = (at["content"], bool(at.get("special")))
    for i, (content, special) in sorted(added.items()):
        if i >= vocab_size:
            raise ModelError(f"{d}: added token {content!r} has id {i} >= the model's {vocab_size} embedding rows")
        if texts.get(i) == content and types.get(i) in (T.CONTROL, T.UNKNOWN, T.BYTE, T.USER_DEFINED):
            continue
        if special or _looks_special(content):
            texts[i], types[i] = content, int(T.CONTROL)
        else:
            texts[i], types[i] = content.replace(_SPIECE, " "), int(T.USER_DEFINED)
        scores[i] = -1000.0
    return set(added)


def _spm_space_prefix(tj: dict | None, config: dict) -> bool | None:
    """Whether the HF tokenizer prepends ▁ to the text (Metaspace prepend_scheme / a Prepend normalizer)."""
    if tj is not None:
        for step in _steps(tj.get("pre_tokenizer")):
            if step.get("type") == "Metaspace":
                scheme = step.get("prepend_scheme")
                if scheme is None:  # tokenizers < 0.14 wrote add_prefix_space
                    return bool(step.get("add_prefix_space", True))
                return scheme in ("first", "always")
        for step in _steps(tj.get("normalizer")):
            if step.get("type") == "Prepend" and step.get("prepend") == _SPIECE:
                return True
        if _replaces_space(tj.get("normalizer")):
            return False
    if isinstance(config.get("add_prefix_space"), bool):
        return config["add_prefix_space"]
    return None


def _merge_pairs(d: Path, merges: list) -> list[tuple[str, str]]:
    out = []
    for m in merges:
        if isinstance(m, str):
            parts = m.split(" ", 1)
        elif isinstance(m, list):
            parts = m
        else:
            parts = []
        if len(parts) != 2:
            raise ModelError(f"{d}/tokenizer.json: malformed merge {m!r}")
        out.append((parts[0], parts[1]))
    return out


# ---- shared helpers ----

def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable JSON: {e}") from None


def _tokenizer_config(d: Path) -> dict:
    cfg = _read_json(d / "tokenizer_config.json")
    return cfg if isinstance(cfg, dict) else {}


def _hf_tokenizer(d: Path, tj: dict):
    """tokenizer.json as a `tokenizers.Tokenizer` (the Rust tokenizer transformers' fast tokenizers wrap)."""
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_str(json.dumps(tj))
    except Exception as e:  # noqa: BLE001 - any parse failure of a corrupt tokenizer.json
        raise ModelError(f"{d}/tokenizer.json: the tokenizers library cannot load it: {e}") from None


def _steps(node: Any) -> list[dict]:
    """A pre_tokenizer/normalizer/decoder JSON flattened out of its Sequences."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        inner = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders") or []
        return [s for n in inner for s in _steps(n)]
    return [node]


def _has_step(node: Any, kind: str) -> bool:
    return any(s.get("type") == kind for s in _steps(node))


def _replaces_space(norm: Any) -> bool:
    return any(s.get("type") == "Replace" and (s.get("pattern") or {}).get("String") == " "
               and s.get("content") == _SPIECE for s in _steps(norm))


def _short(node: Any, limit: int = 400) -> str:
    text = json.dumps(node, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."


def _looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter marks CONTROL even when HF does not call them special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _fill(d: Path, texts: dict[int, str], types: dict[int, int], vocab_size: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Token list in id order, holes filled with [PAD{i}] UNUSED up to vocab_size."""
    if texts and max(texts) >= vocab_size:
        hi = max(texts)
        raise ModelError(f"{d}: the tokenizer has token id {hi} ({texts[hi]!r}) but the model has only {vocab_size} "
                         "embedding rows (vocab_size)")
    if texts and min(texts) < 0:
        raise ModelError(f"{d}: negative token id {min(texts)}")
    tokens = tuple(texts.get(i, f"[PAD{i}]") for i in range(vocab_size))
    ttypes = tuple(int(types[i]) if i in texts else int(T.UNUSED) for i in range(vocab_size))
    return tokens, ttypes


def _dedupe(tokens, ttypes, owners: set[int]):
    """Make every token string unique and non-empty (llama.cpp asserts it): a string used by several ids stays
    with an added token (HF matches those first), else with the lowest id; the others become [DUP{i}] UNUSED."""
    tokens, ttypes = list(tokens), list(ttypes)
    renamed: list[tuple[int, str, str]] = []
    by_text: dict[str, list[int]] = {}
    for i, t in enumerate(tokens):
        if t == "":
            tokens[i] = f"[EMPTY_{i}]"
            renamed.append((i, "", tokens[i]))
        by_text.setdefault(tokens[i], []).append(i)
    taken = set(by_text)
    for text, ids in by_text.items():
        if len(ids) == 1:
            continue
        rank = {int(T.UNUSED): 2}  # holes give way to everything
        keep = min(ids, key=lambda i: (0 if i in owners else rank.get(ttypes[i], 1), i))
        for i in ids:
            if i == keep:
                continue
            new, k = f"[DUP{i}]", 0
            while new in taken:
                k += 1
                new = f"[DUP{i}_{k}]"
            taken.add(new)
            tokens[i], ttypes[i] = new, int(T.UNUSED)
            renamed.append((i, text, new))
    return tuple(tokens), tuple(ttypes), tuple(sorted(renamed))


def _special_vocab(d: Path, vocab_size: int, load_merges: bool) -> gguf.SpecialVocab:
    try:
        return gguf.SpecialVocab(d, load_merges=load_merges, special_token_types=_SPECIAL_TYPES, n_vocab=vocab_size)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{d}: cannot read the special tokens: {e}") from None


def _special_ids(d: Path, sv: gguf.SpecialVocab, config: dict, tokens: tuple[str, ...]) -> dict[str, int]:
    """SpecialVocab's ids, completed from tokenizer_config.json / special_tokens_map.json strings found anywhere
    in the vocabulary (SpecialVocab only looks among added tokens)."""
    special = {k: int(v) for k, v in sv.special_token_ids.items() if k in _SPECIAL_TYPES}
    index = {t: i for i, t in enumerate(tokens)}
    stm = _read_json(d / "special_tokens_map.json")
    for source in (config, stm if isinstance(stm, dict) else {}):
        for name in _SPECIAL_TYPES:
            entry = source.get(f"{name}_token")
            text = entry.get("content") if isinstance(entry, dict) else entry
            if name not in special and isinstance(text, str) and text in index:
                special[name] = index[text]
    return special


def _add_flags(tok, config: dict, special: dict[str, int], sv: gguf.SpecialVocab):
    """add_bos/add_eos as transformers applies them: tokenizer_config.json's explicit flags rebuild the
    post-processor (transformers v5), otherwise tokenizer.json's post-processor decides."""
    add_bos = config.get("add_bos_token") if isinstance(config.get("add_bos_token"), bool) else None
    add_eos = config.get("add_eos_token") if isinstance(config.get("add_eos_token"), bool) else None
    if add_bos is None or add_eos is None:
        bos_pp, eos_pp = _post_processor_adds(tok, special)
        add_bos = bos_pp if add_bos is None else add_bos
        add_eos = eos_pp if add_eos is None else add_eos
    add_sep = sv.add_special_token.get("sep")
    return add_bos, add_eos, add_sep


def _post_processor_adds(tok, special: dict[str, int]) -> tuple[bool, bool]:
    """(adds bos first, adds eos last) for a single sequence, by running the tokenizer.json post-processor."""
    with_sp = tok.encode("a", add_special_tokens=True).ids
    without = tok.encode("a", add_special_tokens=False).ids
    n = len(without)
    if n == 0:
        return False, False
    try:
        start = next(k for k in range(len(with_sp) - n + 1) if with_sp[k:k + n] == without)
    except StopIteration:
        return False, False
    head, tail = with_sp[:start], with_sp[start + n:]
    return (bool(head) and head[0] == special.get("bos", -1)), (bool(tail) and tail[-1] == special.get("eos", -1))


def _check_eos(d: Path, special: dict[str, int], add_bos: bool) -> None:
    if "eos" not in special:  # llama.cpp would fall back to a default id (11 for gpt2) and stop generating on it
        raise ModelError(f"{d}: no eos token found (tokenizer_config.json eos_token, special_tokens_map.json or "
                         "config.json eos_token_id); llama.cpp needs one")
    if add_bos and "bos" not in special:
        raise ModelError(f"{d}: the tokenizer adds a BOS token but none is named (bos_token)")


def _added_token_notes(added: dict) -> tuple[str, ...]:
    odd = [at.content for at in added.values() if at.lstrip or at.rstrip or at.single_word]
    if not odd:
        return ()
    return (f"added tokens with lstrip/rstrip/single_word are matched literally by llama.cpp: {odd[:5]}",)


def _ordered(special: dict[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple((k, special[k]) for k in _SPECIAL_TYPES if k in special)


def _template(t: Any) -> str | tuple[tuple[str, str], ...] | None:
    if t is None or isinstance(t, str):
        return t or None
    return tuple((e["name"], e["template"]) for e in t if isinstance(e, dict) and "name" in e and "template" in e)
