"""X2Edit's 16 edit tasks, and classifiers that map an instruction to one of them.

Task ids and meanings are X2Edit's (paper arXiv 2508.07607; docs/reference.md). X2Edit's public code
(OPPO-Mente-Lab/X2Edit, src/intention_qwen3.py) asks Qwen3-8B, with a Chinese prompt, which of the
labels 删除主体 / 添加主体 / 风格更改 / 背景更改 / 颜色更改 / 材料更改 / 动作更改 / 替换主体 / 人物修图 /
文字更改 / 色调变换 / 相机移动 / implicit_change / low_leval / subject (ids 1..15) an instruction belongs
to; its prompt explains that implicit_change means reasoning ("what happens if ...", changing the
relation between objects), low_leval means Canny/Depth/line image to image, subject means no explicit
edit but a personalised generation of the subject ("A sticker of this object"), and a comment adds
that moving objects left/right and enlarging/shrinking them counts as camera movement. Output that
matches no label falls back to 0.

Two classifiers:
- ``classify_instruction``: built-in weighted keyword/regex rules for English and Chinese;
  deterministic, no download, microseconds per call.
- ``models.task_lm.LocalLMClassifier``: a local transformers causal LM folder, prompted with the task list,
  its
  answer parsed by ``parse_task_answer`` (fallback 0), as X2Edit does with Qwen3-8B.

``resolve_task(mode, instruction)`` is what the task-router node calls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError, X2EditError


class UnknownTaskError(ConfigError):
    """A task name or id is not one of X2Edit's 16 tasks."""


class ClassifierError(X2EditError, RuntimeError):
    """The local LM classifier could not be loaded or run."""


@dataclass(frozen=True)
class Task:
    id: int
    name: str  # stable snake_case identifier
    display_name: str
    x2edit_label: str  # the label X2Edit's classifier prompt uses
    description: str


TASKS: tuple[Task, ...] = (
    Task(0, "unknown", "Unknown / fallback", "unknown", "no recognisable edit type"),
    Task(1, "remove_subject", "Remove subject", "删除主体", "remove or erase an object or person"),
    Task(2, "add_subject", "Add subject", "添加主体", "add a new object or person"),
    Task(3, "style_change", "Style change", "风格更改", "render the whole image in another art style"),
    Task(4, "background_change", "Background change", "背景更改", "replace or alter the background"),
    Task(5, "color_change", "Color change", "颜色更改", "change the colour of an object"),
    Task(6, "material_change", "Material change", "材料更改", "change what an object is made of"),
    Task(7, "action_change", "Action change", "动作更改", "change a pose, action or expression"),
    Task(8, "replace_subject", "Replace subject", "替换主体", "swap one object for another"),
    Task(9, "portrait_retouch", "Portrait retouch", "人物修图", "retouch a face, skin, hair or makeup"),
    Task(10, "text_change", "Text change", "文字更改", "change or add written text"),
    Task(11, "tone_change", "Tone change", "色调变换", "global tone, lighting, time of day, season, weather"),
    Task(12, "camera_move", "Camera move", "相机移动", "zoom, viewpoint, move or resize an object"),
    Task(
        13,
        "implicit_change",
        "Implicit change / reasoning",
        "implicit_change",
        "reasoning about what happens, or changing relations between objects",
    ),
    Task(
        14,
        "low_level",
        "Low-level (canny/depth to image)",
        "low_leval",
        "control image (canny, depth, line art, sketch) to image, or the reverse",
    ),
    Task(
        15,
        "subject_driven",
        "Subject-driven",
        "subject",
        "no explicit edit: a new image of the subject (e.g. a sticker of this object)",
    ),
)

TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
AUTO = "auto"


def _norm_key(text: str) -> str:
    return re.sub(r"[\s\-/]+", "_", text.strip().lower())


_LOOKUP: dict[str, int] = {}
for _t in TASKS:
    for _key in (_t.name, _t.display_name, _t.x2edit_label, str(_t.id)):
        _LOOKUP[_norm_key(_key)] = _t.id


def task_id(name_or_id: int | str) -> int:
    """Task id from an id (0..15, int or digits), a snake_case name, a display name or X2Edit's label."""
    if isinstance(name_or_id, bool):
        raise UnknownTaskError(f"Task must be a name or an id 0..15, got {name_or_id!r}.")
    if isinstance(name_or_id, int):
        if 0 <= name_or_id < len(TASKS):
            return name_or_id
        raise UnknownTaskError(f"Task id {name_or_id} is out of range; X2Edit has ids 0..{len(TASKS) - 1}.")
    if isinstance(name_or_id, str):
        found = _LOOKUP.get(_norm_key(name_or_id))
        if found is not None:
            return found
    raise UnknownTaskError(
        f"Unknown task {name_or_id!r}. Valid names: {', '.join(TASK_NAMES)} (or an id 0..{len(TASKS) - 1})."
    )


def task_by_id(tid: int) -> Task:
    return TASKS[task_id(tid)]


def task_choices() -> list[str]:
    """Options for a router's mode combo: ``auto`` then the 16 task names in id order."""
    return [AUTO, *TASK_NAMES]


# --------------------------------------------------------------------------------------------------
# Built-in rule classifier.
#
# Each rule adds its weight to one task when its pattern occurs; the task with the largest sum wins,
# ties go to the more specific task (PRIORITY). English rules are matched on lower-cased text with
# word boundaries; Chinese rules are plain substrings. Weights: 3 = decisive keyword (e.g.
# "background"), 2 = typical verb or phrase, 1 = weak hint (e.g. the generic 变成 "become").

_COLORS = (
    r"red|blue|green|yellow|purple|violet|pink|orange|black|white|grey|gray|brown|beige|silver|golden|gold"
    r"|cyan|magenta|turquoise|teal|navy|maroon|crimson|scarlet|lavender|lilac|indigo|emerald|olive|ivory"
)
_MATERIALS = (
    r"gold|golden|silver|glass|wood|wooden|marble|metal|metallic|steel|iron|bronze|copper|chrome|brass|stone"
    r"|concrete|leather|ceramic|porcelain|clay|plastic|rubber|ice|crystal|silk|velvet|denim|wool|cotton|fur"
    r"|paper|cardboard|jade|diamond|lego bricks|knitted yarn|yarn|sand|chocolate"
)
_ZH_COLORS = "红|蓝|绿|黄|紫|粉|橙|橘|黑|白|灰|棕|褐|金|银|青|米"
_ZH_MATERIALS = (
    "金子|黄金|银子|玻璃|木头|木质|木制|大理石|金属|钢铁|不锈钢|铁|青铜|铜|石头|石材|皮革|真皮|陶瓷|瓷|黏土|"
    "塑料|橡胶|冰|水晶|丝绸|丝绒|绒|毛绒|布料|纸|玉|钻石"
)
_VERB_START = (
    r"^(please\s+)?(make|turn|change|convert|transform|render|add|put|place|insert|remove|erase|delete|"
    r"replace|swap|give|let|have|move|zoom|rotate|show|paint|recolou?r|apply|use|create|generate|produce|"
    r"extract|colou?ri[sz]e|set|take|get|clear|eliminate|write|edit|correct|increase|decrease|reduce|"
    r"brighten|darken|smooth|whiten|shrink|enlarge|pan|shoot|view|include|draw|fix|improve|enhance|can you)\b"
)

# (task name, weight, rule id, pattern, is_chinese)
# fmt: off
_RULE_SPECS: list[tuple[str, float, str, str, bool]] = [
    # -- remove
    ("remove_subject", 2, "remove_verb",
     r"\b(remove|removing|erase|delete|eliminate|get rid of|take away|take out|wipe out|clear (away|out|"
     r"off))\b"
     r"|\b(take|get) (the |all |any )?\w+( \w+)? (out|away|off)\b|\bclear\b.*\b(off|away|out)\b",
     False),
    ("remove_subject", 2, "without", r"\bwithout (the|any|a|an|its|his|her)\b|\bno longer (there|visible)\b"
     r"|\bshould not be there\b|\bshouldn't be there\b|\bdisappear|\b(has|have|needs?) to go\b", False),
    ("remove_subject", 2, "zh_remove",
     r"去掉|去除|删除|删掉|移除|移走|抹掉|抹去|擦除|擦掉|清除|拿掉|消除|去除掉|不要有|不要出现|消失", True),
    # -- add
    ("add_subject", 2, "add_verb", r"\b(add|adding|insert|include)\b", False),
    ("add_subject", 1.5, "place_verb", r"\b(put|place|let there be|there should be|draw)\b", False),
    ("add_subject", 1, "give_a",
     r"\b(give|have) (the |a |an |him |her |them |it )?\w*\s*(a|an|some)\b", False),
    ("add_subject", 2, "zh_add",
     r"添加|加上|加一|加个|加几|增加|添上|放一|放上|放个|戴上|画一|多一|多了|插入", True),
    ("add_subject", 1.5, "zh_place", r"加入|站着一|坐着一|出现一", True),
    # -- style
    ("style_change", 3, "style_word", r"\b(style|styled|stylized|art ?style|artstyle|aesthetic)\b", False),
    ("style_change", 3, "art_medium",
     r"\b(painting|watercolou?r|oil paint\w*|pencil sketch|charcoal|pastel|pixel art|8-bit|anime|manga|"
     r"cartoon|comic( book)?|illustration|drawing|crayon|woodblock|ukiyo-?e|mosaic|stained glass|"
     r"low ?poly|vaporwave|cyberpunk|steampunk|impressionis\w+|cubis\w+|surreal\w*|pop art|graffiti|"
     r"claymation|ghibli|pixar|disney|van gogh|monet|picasso|rembrandt|renaissance|baroque|art deco|"
     r"art nouveau|sketch|hand-?drawn|in pencil|in ink|in crayon|in charcoal)\b", False),
    ("style_change", 3, "zh_style",
     r"风格|画风|风$|油画|水彩|素描|动漫|卡通|漫画风|像素|水墨|国画|工笔|版画|浮世绘|赛博朋克|蒸汽朋克|"
     r"梵高|莫奈|毕加索|宫崎骏|吉卜力|皮克斯|印象派|插画|手绘|简笔画|剪纸", True),
    # -- background
    ("background_change", 3, "background_word",
     r"(?<!in the )(?<!from the )(?<!of the )\b(background|backdrop|scenery behind)\b", False),
    ("background_change", 3, "sky_swap", r"\b(change|replace|swap) the sky\b", False),
    ("background_change", 2, "scene_set",
     r"\b(in front of (the|a|an)|set the scene|surrounded by|the setting to)\b", False),
    ("background_change", 3, "zh_background", r"背景(?!中|里|上)|背后的景|后面的景|天空换", True),
    ("background_change", 2, "zh_scene", r"放到.{0,8}(前面|前|里|中)|置于", True),
    # -- colour
    ("color_change", 3, "color_word", r"\b(colou?r|recolou?r\w*|hue of|painted|paint job|paint)\b", False),
    ("color_change", 2, "to_color",
     rf"\b(to|into|be|make|turn|turns|are|is|in)\s+(a\s+)?((dark|light|bright|pale|deep|hot|neon|pastel)\s+)?"
     rf"({_COLORS})\b(?!\s+(and|&)\s+(white|black))(?!\s+\w+\s+(on|in|with|of)\b)", False),
    ("color_change", 2, "color_at_end",
     rf"(?<!\ban )(?<!\ba )\b({_COLORS})(ish)?\s*(instead of \w+)?[.!?]?$", False),
    ("color_change", 3, "zh_color_word", r"颜色|配色|上色成|涂成|漆成|染成|刷成", True),
    ("color_change", 2.5, "zh_color", rf"(深|浅|亮|淡|纯)?({_ZH_COLORS})色(?!调)", True),
    # -- material
    ("material_change", 3, "material_word",
     r"\b(material|texture|textured|made (out )?of|metallic|carved (out of|from)|cast in)\b", False),
    ("material_change", 2, "out_of_material", rf"\bout of (an? |solid |pure )?({_MATERIALS})\b", False),
    ("material_change", 2, "to_material",
     rf"\b(into|to|of|be|make|turn|is|from)\s+(an?\s+|solid\s+|pure\s+|polished\s+)*({_MATERIALS})"
     r"(?!\s+of\b)(\s+(sculpture|statue|version|texture|surface|one))?\b", False),
    ("material_change", 2, "material_at_end", rf"\b({_MATERIALS})\s*(instead of \w+)?[.!?]?$", False),
    ("material_change", 3, "zh_material_word", r"材质|材料|质感|做的|制成|做成的|打造的|雕成|纹理", True),
    ("material_change", 2, "zh_material", rf"(成|为|是)({_ZH_MATERIALS})", True),
    # -- action
    ("action_change", 2, "action_verb",
     r"\b(raise|raises|lift|wave|jump|sit|sits|stand|sleep|run|walk|dance|spin|kneel|lie down|crouch|squat|"
     r"gallop|fly|swim|smile|laugh|cry|frown|shout|yawn|wink|clap|point|hug|kiss|bow|stretch|"
     r"cross (his|her|their) arms|arms crossed|spread (its|his|her|their) wings|turn (his|her|its|"
     r"their) head|"
     r"look (to|at|up|down|back)|hold|pose|kick|throw|climb|eat|drink|fold|open (his|her|its) (mouth|eyes)|"
     r"close (his|her|its) eyes|thumbs up|roll over|lie|lean|bend|reach|grab|pick up|pull|push|turn around|"
     r"face (left|right|forward|away)|nod|shake hands|salute|stand up|sit up|ride|sing|play|blow|hands on|"
     r"make a (fist|gesture|peace sign|heart)|jump(s)? (up|over)|shrug|high five|curtsy|bite)\b", False),
    ("action_change", 2, "action_progressive",
     r"\b(be|is|are|being|start|starts|keep|keeps|begin|begins|stop|stops)\s+\w+ing\b", False),
    ("action_change", 2, "zh_action",
     r"举起|举手|抬起|挥手|招手|跳起|跳跃|坐下|坐在|站起|站立|躺下|睡着|睡觉|奔跑|跑起|走路|跳舞|旋转|蹲下|"
     r"跪下|"
     r"笑起来|微笑|大笑|哭|皱眉|眨眼|鼓掌|拥抱|抱胸|抱着|双手|转头|回头|低头|抬头|看向|展开翅膀|张开|闭上眼|"
     r"张嘴|飞起|游泳|踢|扔|爬|吃|喝|姿势|动作|表情|手势|叉腰|趴下|趴着|躺|弯腰|伸手|骑|转身|蹲|比心|点头|"
     r"摇头|"
     r"敬礼|跪|抬腿|伸懒腰|握手|拍手|吹", True),
    ("action_change", 3.5, "zh_eye_action", r"闭上眼|睁开眼|眨眼|闭眼|睁眼", True),
    # -- replace
    ("replace_subject", 2.5, "replace_with",
     r"\b(replace|replaced|replacing|swap|swapped|substitute|exchange)\b|\bswitch (the |this |"
     r"that )?\w+( \w+)? (for|with)\b", False),
    ("replace_subject", 1.5, "into_noun",
     r"\b(turn|turns|change|changes|transform|convert)\s+(the|this|that|his|her|its|a|an)\b.*?\b(in)?to\s+"
     r"(a|an|the|some)\b", False),
    ("replace_subject", 1.5, "be_a_noun",
     r"\b(should be|be|make (the|this) \w+)\s+(a|an)\s+\w+( \w+)?( instead)?[.!?]?$", False),
    ("replace_subject", 1.5, "instead_of", r"\binstead of\b", False),
    ("replace_subject", 2, "zh_replace", r"替换|换成|换为|替代|代替|取代|改成一|变成一", True),
    ("replace_subject", 1, "zh_become", r"变成|变为|改为|改成", True),
    # -- portrait retouch
    ("portrait_retouch", 3, "face_part",
     r"\b(skin|complexion|wrinkles?|pores?|acne|pimples?|blemish\w*|freckles?|teeth|jawline|chin|cheeks?|"
     r"face|facial|eyes? bigger|bigger eyes|larger eyes|eye bags|dark circles|double eyelids?|lips?|"
     r"nose|eyebrows?|eyelash(es)?|lashes|makeup|make-up|lipstick|mascara|eyeliner|blush|hair|hairstyle|"
     r"haircut|hairdo|"
     r"bangs|fringe|bob cut|ponytail|curly|beard|mustache|moustache|bald|slimmer|thinner waist|"
     r"younger|older-looking|retouch\w*|beautif\w+ the (woman|man|girl|boy|person|portrait))\b", False),
    ("portrait_retouch", 3, "zh_face",
     r"皮肤|磨皮|美白|美颜|皱纹|毛孔|痘|色斑|雀斑|斑点|牙齿|下巴|下颌|脸|五官|眼睛|大眼|眼袋|黑眼圈|双眼皮|"
     r"嘴唇|鼻子|"
     r"眉毛|化妆|妆|口红|头发|发型|卷发|直发|短发|长发|刘海|马尾|胡子|胡须|秃|瘦身|瘦腰|修瘦|年轻|修图|精修|"
     r"人像|"
     r"肤色|美妆", True),
    # -- text
    ("text_change", 4, "quoted", r"[\"“”「」《》]|'[^']+'(?!s\b)", False),
    ("text_change", 3, "text_word",
     r"\b(text|texts|word|words|wording|caption|captions|title|headline|slogan|letters?|lettering|font|"
     r"typeface|spelling|spelled|spell|label|subtitle|inscription|says?|reads?|read|writ(e|ten|ing)|"
     r"number|numbers|digits?|license plate|licence plate|date|name|price|price tag|brand)\b|"
     r"[$€£¥]\s?\d", False),
    ("text_change", 3, "zh_text",
     r"文字|字样|字体|写上|写着|(?<!特)写|标语|标题|书名|题目|招牌上的字|号码|数字|日期|"
     r"标签|字幕|签名|文案|改字|的字|门牌|价格|价签|店名|名字|名称|(改成|换成|改为)\d+", True),
    # -- tone
    ("tone_change", 3, "tone_word",
     r"\b(tone|tones|toned|tint|tinted|filter|lighting|lit|brightness|brighter|darker|dim|"
     rf"(bright|dark)(?!\s+({_COLORS}|circles)\b)|"
     r"contrast|saturat\w+|desaturat\w+|exposure|vibrant|vivid|muted|sepia|black and white|black-and-white|"
     r"monochrome|grayscale|greyscale|cinematic|moody|mood|atmosphere|hdr|vintage|retro|film|faded|"
     r"warm|warmer|cool|cooler|golden hour|blue hour)\b", False),
    ("tone_change", 3, "time_weather",
     r"\b(night|night ?time|nighttime|daytime|day time|sunset|sunrise|dusk|dawn|twilight|noon|evening|"
     r"morning|midnight|winter|summer|autumn|fall season|spring ?time|snowy|snowing|rainy|raining|rain|"
     r"foggy|fog|misty|mist|stormy|storm|cloudy|overcast|sunny day|hazy|haze)\b", False),
    ("tone_change", 3, "zh_tone",
     r"色调|冷色|暖色|滤镜|亮度|明亮|调亮|调暗|变暗|变亮|对比度|饱和|鲜艳|黑白|复古|胶片|电影感|氛围|光线|"
     r"光照|"
     r"夜晚|夜景|晚上|黄昏|傍晚|日落|日出|清晨|白天|冬天|夏天|秋天|春天|冬季|夏季|秋季|春季|雪天|下雪|下雨|"
     r"雨天|"
     r"雾|阴天|晴天|曝光|雪|更亮|更暗|亮一|暗一|亮些|暗些", True),
    # -- camera
    ("camera_move", 3, "camera_word",
     r"(?<!at the )(?<!into the )(?<!to the )\b(camera|viewpoint|point of view|perspective|angle|wide shot|"
     r"bird'?s[- ]eye|aerial view|top-?down|overhead view|from above|from below|from the (side|left|right|"
     r"back|"
     r"front)|side view|rear view|front view|view the|pan|tilt|dolly|rotate the (view|image|scene|photo|"
     r"picture)|the back of)\b", False),
    ("camera_move", 4, "zoom", r"\b(zoom|zoomed|zooming|close-?up)\b", False),
    ("camera_move", 2.5, "move_object",
     r"\b(move|moved|shift|slide|push)\b.*\b(left|right|up|down|top|bottom|center|centre|corner|closer|"
     r"away)\b",
     False),
    ("camera_move", 2, "resize_object",
     r"\b(larger|bigger|smaller|shrink|shrunk|enlarge|enlarged|scale (up|down)|"
     r"twice as (big|large)|half the size)\b", False),
    ("camera_move", 3, "zh_camera",
     r"(?<!对着)(?<!看向)(?<!看着)镜头|相机|视角|俯视|仰视|俯拍|仰拍|鸟瞰|特写|近景|远景|全景|侧面看|从侧面|"
     r"背面|正面看|拉近|拉远|角度|正上方|正下方|平移|拍摄|"
     r"移到|移动到|挪到|(左|右|上|下)移|放大|缩小|旋转画面|旋转视角", True),
    # -- implicit / reasoning
    ("implicit_change", 3, "reasoning",
     r"\b(what would|what will|what if|what happens|what happened|how would|imagine|after (it|they|the|a|an|"
     r"being|someone|somebody|he|she|we|you)\b|after \w+ (years?|months?|weeks?|days?|hours?)|"
     r"as an? (old|older|elderly|adult|grown)|in \d+ years|years later|years from now|"
     r"grows? up|grown up|melts?|melted|burn(ed|t)? down|hatch(es|ed)?|rot(s|ten)?|overripe|withers?|"
     r"decay\w*|aged?|ages|switch places|swap places|trade places)\b", False),
    ("implicit_change", 2, "conditional", r"\b(if|unless|once)\b", False),
    ("implicit_change", 2, "zh_elapsed",
     r"(个?(星期|礼拜|月|年|天|小时|周|分钟))(后|之后|以后)|会变成什么|会.{0,4}什么样", True),
    ("implicit_change", 3, "zh_reasoning",
     r"会是什么样|会怎样|会怎么样|会发生什么|之后|以后|后会|如果|假如|年后|天后|交换位置|互换位置|融化|燃尽|"
     r"孵化|腐烂|枯萎|长大", True),
    # -- low level
    ("low_level", 4, "control_map",
     r"\b(canny|depth ?map|depth image|depth to image|depth|edge map|edges|edge image|line ?art|line drawing|"
     r"scribble|segmentation( map)?|semantic map|normal map|pose skeleton|openpose|hed|soft edge|"
     r"to image:)\b", False),
    ("low_level", 4, "sketch_to_photo",
     r"\b(sketch|drawing|outline|doodle)\b.*\b(realistic|real|photo|photograph|generate|image)\b|"
     r"\b(photo|image|picture)\b.*\bfrom (this|the|a|my) (\w+ )?(sketch|drawing|outline|doodle)\b|"
     r"\b(colou?ri[sz]e|deblur|denoise|super-?resolution|upscale|restore)\b", False),
    ("low_level", 4, "zh_control",
     r"canny|边缘|深度图|深度|线稿|线条图|分割图|语义图|涂鸦|骨架|法线图", True),
    ("low_level", 2, "zh_sketch_to_photo",
     r"草图.*(真实|照片|生成)|(生成|变成).*(真实照片|逼真)|去模糊|去噪|超分|上色", True),
    # -- subject driven: a description of the subject, no edit verb
    ("subject_driven", 3.5, "this_subject",
     r"^(this|these|the same)\b|^(a|an|the)\b.*\b(this|these|the same)\b", False),
    ("subject_driven", 2, "product_of",
     r"\b(sticker|plush|plushie|figurine|poster|logo|mug|t-?shirt print|keychain|emoji|icon|mascot|"
     r"product|character)\b", False),
    ("subject_driven", 3.5, "zh_this", r"^(以)?这(个|只|双|位|件|辆|款|张|把|条|头|匹|盆)", True),
    ("subject_driven", 2, "zh_product", r"贴纸|毛绒玩具|手办|海报|logo|周边|表情包|绘本|吉祥物", True),
]

# Tie-break: more specific tasks first.
PRIORITY: tuple[str, ...] = (
    "text_change", "low_level", "implicit_change", "portrait_retouch", "material_change",
    "background_change", "style_change", "color_change", "tone_change", "camera_move", "action_change",
    "replace_subject", "remove_subject", "add_subject", "subject_driven", "unknown",
)
# fmt: on

_RULES = [
    (task_id(task), weight, rule, re.compile(pattern)) for task, weight, rule, pattern, _zh in _RULE_SPECS
]
_VERB_START_RE = re.compile(_VERB_START)
_MODAL_RE = re.compile(r"\b(should|would|will|must|could|can|needs? to|what|how)\b")
_HAS_CJK_RE = re.compile(r"[\u4e00-\u9fff]")
_PRIORITY_RANK = {task_id(name): rank for rank, name in enumerate(PRIORITY)}


@dataclass(frozen=True)
class Classification:
    task_id: int
    score: float  # winning task's share of all matched weight, 0..1 (0 when nothing matched)
    matched_rule: str  # the winning task's strongest rule, or "none"

    @property
    def task_name(self) -> str:
        return TASKS[self.task_id].name

    def __iter__(self):  # allows ``tid, score, rule = classify_instruction(text)``
        return iter((self.task_id, self.score, self.matched_rule))


def rule_scores(text: str) -> dict[int, tuple[float, str]]:
    """Per task: (summed weight of matched rules, strongest matched rule id)."""
    lowered = " ".join(text.lower().split())
    totals: dict[int, float] = {}
    strongest: dict[int, tuple[float, str]] = {}
    imperative = bool(_VERB_START_RE.search(lowered))
    for tid, weight, rule, pattern in _RULES:
        if tid == 15 and rule in ("this_subject", "product_of") and (imperative or _MODAL_RE.search(lowered)):
            continue  # "make this cat ..." / "this cat should ..." is an edit, not a description
        if pattern.search(lowered):
            totals[tid] = totals.get(tid, 0.0) + weight
            if weight > strongest.get(tid, (0.0, ""))[0]:
                strongest[tid] = (weight, rule)
    return {tid: (total, strongest[tid][1]) for tid, total in totals.items()}


def classify_instruction(text: str) -> Classification:
    """Built-in English + Chinese rule classifier. Returns (task_id, score 0..1, matched_rule)."""
    if not isinstance(text, str) or not text.strip():
        return Classification(0, 0.0, "empty")
    scores = rule_scores(text)
    if not scores:
        return Classification(0, 0.0, "none")
    best = max(scores, key=lambda t: (scores[t][0], -_PRIORITY_RANK[t]))
    total = sum(s for s, _ in scores.values())
    return Classification(best, round(scores[best][0] / total, 4), scores[best][1])


# --------------------------------------------------------------------------------------------------
# Local causal-LM classifier.

_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)


def _answer_aliases() -> list[tuple[str, int]]:
    aliases: list[tuple[str, int]] = []
    for t in TASKS:
        for alias in {t.name, t.name.replace("_", " "), t.display_name, t.x2edit_label}:
            aliases.append((alias.lower(), t.id))
    aliases.append(("low_level", 14))
    aliases.append(("low level", 14))
    return aliases


_ANSWER_ALIASES = _answer_aliases()
_NUMBER_RE = re.compile(r"(?<![\d.])(\d{1,2})(?![\d.])")


def parse_task_answer(answer: str) -> int:
    """Task id from an LM's free-text answer; 0 when nothing recognisable is in it.

    Drops ``<think>...</think>``; then the earliest (longest at a tie) task label or name wins; failing
    that, the first standalone number 0..15.
    """
    if not isinstance(answer, str):
        return 0
    text = _THINK_RE.sub(" ", answer).lower()
    hits = []
    for alias, tid in _ANSWER_ALIASES:
        pos = text.find(alias)
        if pos >= 0:
            hits.append((pos, -len(alias), tid))
    if hits:
        return min(hits)[2]
    for match in _NUMBER_RE.finditer(text):
        value = int(match.group(1))
        if 0 <= value < len(TASKS):
            return value
    return 0


def build_lm_prompt(instruction: str) -> str:
    """Our classification prompt (English, with X2Edit's Chinese labels), asking for one id."""
    lines = [
        "Classify an image-editing instruction into exactly one of these edit types.",
        "Answer with the number and the name only, e.g. '5 color_change'.",
    ]
    for t in TASKS[1:]:
        lines.append(f"{t.id} {t.name} ({t.x2edit_label}): {t.description}")
    lines.append("0 unknown: none of the above")
    lines.append(f"Instruction: {instruction.strip()}")
    lines.append("Answer:")
    return "\n".join(lines)


def resolve_task(mode: str | int, instruction: str = "", classifier=None) -> Classification:
    """The router's decision: ``auto`` classifies ``instruction`` (with ``classifier`` if given, else the
    built-in rules); any other mode is a task name or id, used as is (score 1)."""
    if isinstance(mode, str) and mode.strip().lower() == AUTO:
        if classifier is not None:
            return classifier(instruction)
        return classify_instruction(instruction)
    return Classification(task_id(mode), 1.0, "forced")
